"""Save/load through the PEFT format registry, and PEFT-side model builders (tests only).

``load_into`` / ``save_from`` use ``fxpeft.load`` / ``fxpeft.save`` when they exist, else the
registry's key mapping and config translation directly (the same pieces save/load use).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import fxpeft
from fxpeft.adapters import adapter_state_dict
from fxpeft.peft_format import PEFT_PREFIX, format_for_kind, format_for_type, to_peft_key


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
    if hasattr(fxpeft, "load"):
        return fxpeft.load(model, folder)
    config = json.loads((Path(folder) / "adapter_config.json").read_text())
    fmt = format_for_type(config["peft_type"])
    gm = fxpeft.rewrite(model, fmt.to_rules(config, model, str(folder)))
    state = {k[len(PEFT_PREFIX):]: v for k, v in
             load_file(str(Path(folder) / "adapter_model.safetensors")).items()}
    missing, unexpected = gm.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if k in adapter_state_dict(gm)], (missing, unexpected)
    return gm


def save_from(gm: torch.nn.Module, folder: Path) -> None:
    if hasattr(fxpeft, "save"):
        return fxpeft.save(gm, folder)
    info = gm.meta["fxpeft"]
    kinds = {m.rule.rewrite for m in info["matches"]}
    (kind,) = kinds
    fmt = format_for_kind(kind)
    config = {"peft_type": fmt.peft_type, "task_type": "CAUSAL_LM",
              **fmt.to_config(info["matches"], info["program"])}
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / "adapter_config.json").write_text(json.dumps(config))
    state = {to_peft_key(k, "default", fmt.components): v.contiguous()
             for k, v in adapter_state_dict(gm).items()}
    save_file(state, str(Path(folder) / "adapter_model.safetensors"))
