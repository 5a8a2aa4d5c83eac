"""Method registry. Each method module registers itself by name; the name is the recipe's `method:`."""

from __future__ import annotations

from calq.methods import corda, eora, gptq, prune, ptq161, quamba, quamba2, rtn, xquant  # noqa: F401,E402  (explicit imports fill the registry)
from calq.methods.registry import METHODS, register  # noqa: F401
