"""fxpeft: parameter-efficient fine-tuning as a compiler pass over torch.fx graphs.

>>> import fxpeft
>>> callable(fxpeft.rewrite) and callable(fxpeft.explain)
True
"""

import importlib
from typing import Any

from fxpeft import rules
from fxpeft.api import (AdaptedModule, AdapterFileError, AutoAdaptedModel, AutoAdaptedModelForCausalLM,
                        AutoAdaptedModelForSequenceClassification, CaptureError, FxpeftError, MatchError,
                        PassError, RuleError, adapter_state_dict, add_adapter, explain, fuse,
                        generate, layer_units, load, merge, merge_into, reference_model, rewrite, save,
                        trainable_parameters)
from fxpeft.api import combine, export_lora, load_into_slot, package, unload_slot
from fxpeft.api import __all__ as _public
from fxpeft.kinds import builtin  # noqa: F401  registers the adapter kinds

__all__ = [*_public, "rules", "Trainer", "AdapterCheckpoints", "with_adapter_checkpoints"]
_TRAINER_NAMES = ("Trainer", "AdapterCheckpoints", "with_adapter_checkpoints")


def __getattr__(name: str) -> Any:
    """``fxpeft.Trainer``, ``fxpeft.AdapterCheckpoints`` and ``fxpeft.with_adapter_checkpoints``
    (``fxpeft.tools.trainer``) import ``transformers.Trainer``, which takes seconds: only when
    asked for.

    >>> import fxpeft
    >>> fxpeft.Trainer.__module__
    'fxpeft.tools.trainer'
    """
    if name in _TRAINER_NAMES:
        return getattr(importlib.import_module("fxpeft.tools.trainer"), name)
    raise AttributeError(f"module 'fxpeft' has no attribute {name!r}")
