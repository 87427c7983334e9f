"""Model-agnostic pieces of sequence parallelism: the shard layout, the process groups and degrees,
attention over a sharded sequence (Ulysses all-to-all, ring, exact merging of partial softmaxes), and
per-run device constants. The wrapper that runs a model's forward with them is
``xdit_context_parallel``; each model family's hooks are in ``models``."""
from __future__ import annotations

import enum


class Role(enum.Enum):
    """What an attention call sees of the sharded sequence; a model family tags its attention modules
    with one (``models``), and the forward routes each call by it."""

    SHARDED_SELF = "sharded self-attention"  # queries and keys: this rank's share of the sharded sequence
    SHARDED_KEYS = "sharded keys"  # queries whole on every rank (another stream), keys this rank's share
