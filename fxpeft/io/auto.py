"""Class-level entry points in the style of PEFT's ``AutoPeftModelForCausalLM.from_pretrained``:
``fxpeft.AutoAdaptedModelForCausalLM.from_pretrained(folder, **options)`` is
``fxpeft.load(folder, **options)`` (the base from the folder's ``base_model_name_or_path``),
with PEFT's keyword names, and a check, as PEFT makes, that the folder's task type is the class's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from fxpeft.errors import FxpeftError
from fxpeft.io.serialize import load
from fxpeft.runtime.adapted_module import AdaptedModule


class AutoAdaptedModel:
    """Loads an adapter folder and the base it names, whatever its task type.

    >>> import tempfile, fxpeft
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> base = tempfile.mkdtemp() + "/base"
    >>> LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, vocab_size=32,
    ...                  num_hidden_layers=1, num_attention_heads=2)).save_pretrained(base)
    >>> gm = fxpeft.rewrite(LlamaForCausalLM.from_pretrained(base), "lora_qv")
    >>> folder = fxpeft.save(gm, tempfile.mkdtemp() + "/qv")
    >>> fxpeft.AutoAdaptedModelForCausalLM.from_pretrained(folder).adapter_names
    ['default']
    """

    task_type: ClassVar[str | None] = None  # PEFT's task type this class loads (None: any)

    @classmethod
    def from_pretrained(cls, folder: "str | Path", adapter_name: str = "default",
                        is_trainable: bool = False, **base_options: Any) -> AdaptedModule:
        """The adapted graph of ``folder`` (``fxpeft.load(folder, adapter=adapter_name,
        trainable=is_trainable, **base_options)``); ``base_options`` (``dtype``,
        ``quantization_config``, ``device_map``) go to the base's ``from_pretrained``."""
        cls._check_task_type(Path(folder))
        return load(folder, adapter=adapter_name, trainable=is_trainable, **base_options)

    @classmethod
    def _check_task_type(cls, folder: Path) -> None:
        path = folder / "adapter_config.json"
        try:
            found = json.loads(path.read_text()).get("task_type")
        except (OSError, ValueError, AttributeError):
            return  # fxpeft.load names what is wrong with the folder
        if cls.task_type is not None and found is not None and found != cls.task_type:
            raise FxpeftError(f"{path}: task_type is {found!r}, but {cls.__name__} loads "
                              f"{cls.task_type!r} adapters; use the class for {found!r} or "
                              f"fxpeft.AutoAdaptedModel")


class AutoAdaptedModelForCausalLM(AutoAdaptedModel):
    """``AutoAdaptedModel`` for causal-LM adapters (PEFT's ``AutoPeftModelForCausalLM``)."""

    task_type = "CAUSAL_LM"


class AutoAdaptedModelForSequenceClassification(AutoAdaptedModel):
    """``AutoAdaptedModel`` for classifier adapters (``AutoPeftModelForSequenceClassification``)."""

    task_type = "SEQ_CLS"
