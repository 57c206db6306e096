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
