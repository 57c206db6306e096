"""The base model an adapter folder names: ``fxpeft.load(folder)`` without a model loads it from
``base_model_name_or_path`` (a local folder; there is no model hub here), with the transformers
Auto class of the folder's ``task_type``, as PEFT's ``AutoPeftModel...from_pretrained`` does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from fxpeft.errors import FxpeftError

# PEFT's task types -> the transformers Auto class that builds such a model
AUTO_CLASSES = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
                "TOKEN_CLS": "AutoModelForTokenClassification",
                "QUESTION_ANS": "AutoModelForQuestionAnswering",
                "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "FEATURE_EXTRACTION": "AutoModel"}


def local_name(name_or_path: "str | None") -> "str | None":
    """What ``fxpeft.save`` writes as ``base_model_name_or_path``: a base loaded from a local
    folder is named by that folder's absolute path, so ``load(folder)`` finds it from anywhere.

    >>> local_name(None), local_name("meta-llama/Llama-3-8B")
    (None, 'meta-llama/Llama-3-8B')
    """
    if name_or_path and os.path.isdir(name_or_path):
        return str(Path(name_or_path).resolve())
    return name_or_path or None


def base_folder(config: dict[str, Any], source: Path) -> Path:
    """The local folder ``config``'s ``base_model_name_or_path`` names, or a one-line error."""
    name = config.get("base_model_name_or_path")
    if not name:
        raise FxpeftError(f"{source}: base_model_name_or_path is empty, so the base model is "
                          f"unknown; pass it: fxpeft.load(model, folder)")
    path = Path(name) if Path(name).is_absolute() else source.parent / name
    path = path if path.is_dir() else Path(name)
    if not path.is_dir():
        raise FxpeftError(f"{source}: base_model_name_or_path {name!r} is not a local folder "
                          f"(fxpeft loads no model from a hub); pass the base model: "
                          f"fxpeft.load(model, folder)")
    return path


def model_class(config: dict[str, Any], folder: Path) -> type:
    """The Auto class of the adapter's ``task_type``; without one, the base's own architecture
    (its ``config.json``), as the checkpoint was saved."""
    import transformers
    if config.get("task_type") in AUTO_CLASSES:
        return getattr(transformers, AUTO_CLASSES[config["task_type"]])
    architectures = transformers.AutoConfig.from_pretrained(folder).architectures or []
    return next((getattr(transformers, a) for a in architectures if hasattr(transformers, a)),
                transformers.AutoModel)


def load_base(config: dict[str, Any], source: Path, options: dict[str, Any]) -> torch.nn.Module:
    """The base model ``config`` names, built by ``from_pretrained(folder, **options)`` (``dtype``,
    ``quantization_config``, ``device_map``, ...), in eval mode."""
    folder = base_folder(config, source)
    auto = model_class(config, folder)
    try:
        model = auto.from_pretrained(folder, **options)
    except (OSError, ValueError, TypeError) as err:
        raise FxpeftError(f"{source}: cannot load the base model from {folder} with "
                          f"{auto.__name__}: {str(err).splitlines()[0]}") from None
    return model.eval()
