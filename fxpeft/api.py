"""The public face: every name ``fxpeft`` offers, from the stage that defines it.

``rewrite`` is the whole pipeline (capture -> emit -> match -> the kinds' passes); ``fuse`` and
``merge`` are optional passes on an emitted copy; ``save`` / ``load`` keep only the adapters, in
HF PEFT's layout; ``generate`` decodes with a KV cache.

>>> from fxpeft import api
>>> sorted(api.__all__)[:4]
['AdaptedModule', 'AdapterFileError', 'AutoAdaptedModel', 'AutoAdaptedModelForCausalLM']
"""

from fxpeft.errors import CaptureError, FxpeftError, MatchError, PassError, RuleError
from fxpeft.generation.decoding import generate
from fxpeft.generation import hf_generate  # noqa: F401  provides gm.generate
from fxpeft.generation.package import package
from fxpeft.io import checkpoints  # noqa: F401  provides gm.save_pretrained
from fxpeft.io.export_lora import export_lora
from fxpeft.io.auto import (AutoAdaptedModel, AutoAdaptedModelForCausalLM,
                            AutoAdaptedModelForSequenceClassification)
from fxpeft.graph.params import adapter_state_dict
from fxpeft.io.serialize import AdapterFileError, load, save
from fxpeft.runtime.adapted_module import AdaptedModule
from fxpeft.runtime.rewrite import add_adapter, explain, rewrite, trainable_parameters
from fxpeft.transforms.fuse import fuse
from fxpeft.transforms.combine import combine
from fxpeft.transforms import backbone  # noqa: F401  provides gm.base_model
from fxpeft.transforms.merge import merge, merge_into
from fxpeft.transforms.reference import reference_model
from fxpeft.transforms.slots import load_into_slot, unload_slot
from fxpeft.transforms.units import layer_units

__all__ = ["AdaptedModule", "AdapterFileError", "AutoAdaptedModel", "AutoAdaptedModelForCausalLM",
           "AutoAdaptedModelForSequenceClassification", "CaptureError", "FxpeftError", "MatchError",
           "PassError", "RuleError", "adapter_state_dict", "add_adapter", "combine", "explain",
           "export_lora", "fuse", "generate", "layer_units", "load", "load_into_slot", "merge",
           "merge_into", "package", "reference_model", "rewrite", "save", "trainable_parameters",
           "unload_slot"]
