"""fxpeft: parameter-efficient fine-tuning as a compiler pass over torch.fx graphs.

>>> import fxpeft
>>> callable(fxpeft.rewrite) and callable(fxpeft.explain)
True
"""

import importlib
from typing import Any

from fxpeft import rules
from fxpeft.kinds import builtin  # noqa: F401  registers the adapter kinds
from fxpeft.adapters import adapter_state_dict
from fxpeft.decoding import generate
from fxpeft.api import add_adapter, explain, rewrite, trainable_parameters
from fxpeft.errors import CaptureError, FxpeftError, MatchError, PassError, RuleError
from fxpeft.graph_module import AdaptedModule
from fxpeft.merge import merge, merge_into
from fxpeft.serialize import AdapterFileError, load, save
from fxpeft.transforms.fuse import fuse

__all__ = ["AdaptedModule", "AdapterFileError", "CaptureError", "FxpeftError", "MatchError",
           "PassError", "RuleError", "adapter_state_dict", "add_adapter", "explain", "fuse", "generate", "load", "merge",
           "merge_into", "rewrite", "rules", "save", "trainable_parameters", "Trainer"]


def __getattr__(name: str) -> Any:
    """``fxpeft.Trainer`` (``fxpeft.trainer``) imports ``transformers.Trainer``, which takes
    seconds: only when asked for.

    >>> import fxpeft
    >>> fxpeft.Trainer.__module__
    'fxpeft.trainer'
    """
    if name == "Trainer":
        return importlib.import_module("fxpeft.trainer").Trainer
    raise AttributeError(f"module 'fxpeft' has no attribute {name!r}")
