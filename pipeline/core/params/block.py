"""What every params block shares: the error that names a field, and a block that forbids unknown keys."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ParamsError(ValueError):
    """A malformed params file; the message names the field path (`variants.tpa.rank_k: ...`)."""


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid")
