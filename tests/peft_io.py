"""PEFT-side model builders, and save/load helpers for the PEFT-format tests (tests only)."""

from __future__ import annotations

from pathlib import Path

import torch

import fxpeft


def peft_adapted(model, kind: str):
    """PEFT's own adapter of ``kind`` on ``model``, as the issue specifies it."""
    from peft import AdaptionPromptConfig, IA3Config, get_peft_model
    configs = {
        "adaption_prompt": lambda: AdaptionPromptConfig(adapter_len=10, adapter_layers=2,
                                                        task_type="CAUSAL_LM"),
        "ia3": lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                 feedforward_modules=["down_proj"], task_type="CAUSAL_LM"),
    }
    return get_peft_model(model, configs[kind]()).eval()


def load_into(model: torch.nn.Module, folder: Path) -> torch.nn.Module:
    return fxpeft.load(model, folder)


def save_from(gm: torch.nn.Module, folder: Path) -> None:
    fxpeft.save(gm, folder)


# --- PEFT's custom-model matrix (bench/peft_custom_matrix.py, tests/kinds/test_custom_matrix.py) --

MATRIX_MARKS = ("lora_", "ia3_l")  # the adapter tensors of the matrix's kinds


def perturb_adapters(model: torch.nn.Module, seed: int = 1, scale: float = 0.1) -> None:
    """Move every adapter tensor of a matrix case off its init (IA3 vectors around 1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(mark in name for mark in MATRIX_MARKS) and param.dtype.is_floating_point:
                param.add_(torch.randn(param.shape, generator=generator) * scale)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / (1 + b.abs().max()))


def matrix_case(model_id: str, config_class: type, kwargs: dict, folder: Path) -> dict:
    """One row of PEFT's custom-model matrix: PEFT builds and saves the adapter; fxpeft loads it,
    saves it back for ``PeftModel.from_pretrained``, and merges. The errors against PEFT's
    outputs (``load``, ``back``, ``merge``; merge is the refusal's text where fxpeft refuses to
    merge). An ``FxpeftError`` from the load (a refusal) propagates."""
    from peft import PeftModel, get_peft_model
    from peft_models import custom_model, matrix_input
    from fxpeft.errors import FxpeftError
    x = matrix_input(model_id)
    peft_model = get_peft_model(custom_model(model_id), config_class(**kwargs)).eval()
    perturb_adapters(peft_model)
    with torch.no_grad():
        expected = peft_model(x)
    peft_model.save_pretrained(folder / "peft")
    gm = fxpeft.load(custom_model(model_id), folder / "peft").eval()
    with torch.no_grad():
        errors: dict = {"load": relative_error(gm(x), expected)}
        back = PeftModel.from_pretrained(custom_model(model_id), str(fxpeft.save(gm, folder / "ours")))
        errors["back"] = relative_error(back.eval()(x), expected)
        try:
            errors["merge"] = relative_error(fxpeft.merge(gm)(x), expected)
        except FxpeftError as refusal:
            errors["merge"] = str(refusal)
    return errors
