"""The lean attention on the tiny models: its ranges shrunk to a few tokens (the tiny clips have 96 video
tokens), so every range path runs, and a record of where self-attention's values land."""
import contextlib

RANGES = {"QUERY_CHUNK_TOKENS": 5, "PROJECTION_CHUNK_TOKENS": 11}  # lean_attention's
ROPE_CHUNK_TOKENS = 7  # models/ltx_rope's
LONG = RANGES["PROJECTION_CHUNK_TOKENS"]  # a sequence longer than this goes by ranges


def shrink(lean, rope, set_attr=setattr):
    """Set the ranges of ``lean`` (lean_attention) and ``rope`` (models/ltx_rope) to a few tokens, with
    ``set_attr`` (pytest's ``monkeypatch.setattr`` to put them back after a test)."""
    for name, tokens in RANGES.items():
        set_attr(lean, name, tokens)
    set_attr(rope, "CHUNK_TOKENS", ROPE_CHUNK_TOKENS)


@contextlib.contextmanager
def values_recorded(lean, keep_gate=True):
    """Record, for each self-attention value projection of a long sequence, whether it went into its
    input's buffer; ``keep_gate`` False: the gate patch is left out (the twin: the gate then reads v)."""
    real = lean.value_in_input
    seen = []

    def recording(attn):
        (obj, name, value), *rest = real(attn)

        def run(x):
            out = value(x)
            if x.shape[1] > LONG:
                seen.append(out.data_ptr() == x.data_ptr())
            return out
        return [(obj, name, run)] + (rest if keep_gate else [])

    lean.value_in_input = recording
    try:
        yield seen
    finally:
        lean.value_in_input = real
