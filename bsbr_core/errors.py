"""The errors bsbr_core raises for input its caller gave it (docs/architecture.md 2.4).

`InputError` means "this input cannot be read by this model": token ids
outside the vocabulary, a piece whose batch differs from its state's, a
left-padded attention mask, pieces and states that do not pair up. A server
maps exactly this type to a client error; any other exception out of the
model is a fault of the code or the machine, not of the request.

`StateError` is the InputError of carried state: a blob that is corrupt,
truncated, of another format version, or made by another model.

Both subclass ValueError, so code written against the earlier ValueErrors
still catches them.
"""
from __future__ import annotations


class InputError(ValueError):
    """Input this model cannot read (ids, masks, batches, pieces, states)."""


class StateError(InputError):
    """A state blob is corrupt, of an unknown version, or made by another model."""
