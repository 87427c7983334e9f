"""Per-forward instance patches and the checks they rely on: set attributes on one model's modules
for the duration of a ``with`` and put back what was there; tell whether a tensor is a temporary its
caller drops (so its buffer may take an output); find ``transformer_options`` in a forward's call."""
from __future__ import annotations

import contextlib

import torch

_MISSING = object()


@contextlib.contextmanager
def instance_attrs(triples):
    """Set ``(obj, name, value)`` instance attributes for the ``with`` body, then put back what the
    instances had (nothing, usually): patches one forward of one model, never the class."""
    saved = []
    try:
        for obj, name, value in triples:
            saved.append((obj, name, obj.__dict__.get(name, _MISSING)))
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, old in reversed(saved):
            if old is _MISSING:
                obj.__dict__.pop(name, None)
            else:
                obj.__dict__[name] = old


def may_overwrite(x: torch.Tensor, whole_view: bool = False) -> bool:
    """True when ``x`` owns its storage, is contiguous and no autograd needs it: a temporary the LTX
    code drops after the call (the FFN input, attention's q) can take the output instead of a new
    buffer. ``whole_view``: a view spanning all of its storage also counts (a reshape that had to copy
    returns a view of that private copy)."""
    own = x._base is None or (whole_view and x.storage_offset() == 0
                              and x.untyped_storage().nbytes() == x.numel() * x.element_size())
    return own and x.is_contiguous() and not (x.requires_grad and torch.is_grad_enabled())


def transformer_options_at(position: int, args, kwargs) -> dict:
    """``transformer_options`` of a forward call that takes them as argument ``position`` (a model family's
    ``TRANSFORMER_OPTIONS_ARG``), however it was passed."""
    if "transformer_options" in kwargs:
        return kwargs["transformer_options"]
    return args[position] if len(args) > position else {}


def with_transformer_options_at(position: int, args, kwargs, options: dict):
    """``(args, kwargs)`` of the same call with ``options`` as its transformer_options."""
    if "transformer_options" in kwargs:
        return args, {**kwargs, "transformer_options": options}
    return (*args[:position], options, *args[position + 1:]), kwargs
