"""fxpeft: parameter-efficient fine-tuning as a compiler pass over torch.fx graphs.

>>> import fxpeft
>>> callable(fxpeft.rewrite) and callable(fxpeft.explain)
True
"""

from fxpeft import rules
from fxpeft.adapters import adapter_state_dict
from fxpeft.api import explain, rewrite, trainable_parameters
from fxpeft.errors import CaptureError, FxpeftError, MatchError, PassError, RuleError
from fxpeft.graph_module import AdaptedModule

__all__ = ["AdaptedModule", "CaptureError", "FxpeftError", "MatchError", "PassError", "RuleError",
           "adapter_state_dict", "explain", "rewrite", "rules", "trainable_parameters"]
