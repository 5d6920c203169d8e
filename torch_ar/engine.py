"""The call into the C++ engine: an `EngineConfig` per wrapper, read from
`RelaxConfig` by name (csrc/engine/config.h lists the options once), and one
`Relaxation` per forward, captured when the forward ends."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from torch_ar import _C
from torch_ar.config import RelaxConfig

EngineConfig = _C.EngineConfig
Relaxation = _C.Relaxation

# EngineConfig's option names: RelaxConfig's fields of these names cross as
# they are, the variant as what it changes, and the forward's nonfinite rule.
ENGINE_OPTION_NAMES: tuple[str, ...] = tuple(_C.engine_option_names())


def engine_options(config: RelaxConfig, raise_on_nonfinite: bool) -> dict[str, Any]:
    """The keyword options of `EngineConfig` for ``config``."""
    names = set(ENGINE_OPTION_NAMES)
    options = {f.name: getattr(config, f.name) for f in fields(config) if f.name in names}
    options.update(config.variant_spec.engine_options())
    options["raise_on_nonfinite"] = raise_on_nonfinite
    return options
