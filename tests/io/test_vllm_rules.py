"""vLLM's rules for a LoRA folder, applied to every folder ``fxpeft.export_lora`` writes.

vLLM does not run here, so its checks are restated from its source, read at these commits of
github.com/vllm-project/vllm:

- vllm/lora/peft_helper.py @ e745bafffc44744aa601169f8c6f325e47ca7cd5
  (``PEFTHelper.from_dict``, ``_validate_features``, ``__post_init__``, ``validate_legal``):
  R1  ``r``, ``lora_alpha`` and ``target_modules`` are required fields ("Missing required
      configuration fields");
  R2  "vLLM only supports modules_to_save being None.";
  R3  "vLLM does not yet support DoRA." (``use_dora``);
  R4  "LoRA rank {r} is greater than max_lora_rank {max_lora_rank}.";
  R5  "Adapter bias cannot be used without bias_enabled." (``bias`` must be "none"; the server
      default has no bias);
  R6  the scale is ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), one for
      every module: ``from_dict`` drops the fields it does not know, ``rank_pattern`` and
      ``alpha_pattern`` among them, so a folder that needs them is mis-scaled. Hence: no
      patterns, and every ``lora_A`` has ``r`` rows and every ``lora_B`` ``r`` columns.
- vllm/config/lora.py @ 01230b40128e570a58e54e75f7e55c4d5cd9246d:
  R7  ``MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]``: the server's
      ``max_lora_rank`` is one of these (we ask the folder's ``r`` to be one too, so the server can
      be started at exactly the folder's rank).
- vllm/lora/utils.py @ 001e63a89b474b88345fd72912fe068c4ae83f41 (``parse_fine_tuned_lora_name``,
  ``get_supported_lora_modules``):
  R8  every tensor is ``<module>.lora_A.weight`` or ``<module>.lora_B.weight`` (else "is
      unsupported LoRA weight"; embeddings and biases are not written by the export), under
      ``base_model.model.``;
  R9  "In vLLM, all linear layers support LoRA": each module is a linear layer of the model, and
      its tensors have the layer's shapes (``lora_A`` [r, in], ``lora_B`` [out, r]).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_llama
from export_cases import EXPORTS, exported

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_REQUIRED = ("r", "lora_alpha", "target_modules")


def _config_rules(config: dict, max_lora_rank: int) -> list[str]:
    broken = [f"R1: missing {name}" for name in _REQUIRED if name not in config]
    if config.get("modules_to_save"):
        broken.append("R2: modules_to_save is not None")
    if config.get("use_dora"):
        broken.append("R3: use_dora")
    r = config.get("r", 0)
    if r > max_lora_rank:
        broken.append(f"R4: r = {r} > max_lora_rank {max_lora_rank}")
    if config.get("bias", "none") != "none":
        broken.append(f"R5: bias = {config['bias']!r}")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        broken.append("R6: rank_pattern / alpha_pattern, which vLLM drops")
    if max_lora_rank not in VLLM_MAX_LORA_RANKS or r not in VLLM_MAX_LORA_RANKS:
        broken.append(f"R7: r = {r} / max_lora_rank = {max_lora_rank} not in {VLLM_MAX_LORA_RANKS}")
    return broken


def _module(name: str) -> tuple[str, str] | None:
    """R8: ``base_model.model.<module>.lora_A.weight`` -> (module, "lora_A"), else None."""
    parts = name.split(".")
    if not name.startswith("base_model.model.") or parts[-1] != "weight" or \
            parts[-2] not in ("lora_A", "lora_B"):
        return None
    return ".".join(parts[2:-2]), parts[-2]


def _tensor_rules(tensors: dict, r: int, model: torch.nn.Module) -> list[str]:
    broken = []
    for name, tensor in tensors.items():
        parsed = _module(name)
        if parsed is None:
            broken.append(f"R8: {name} is an unsupported LoRA weight")
            continue
        path, part = parsed
        layer = dict(model.named_modules()).get(path)
        if not isinstance(layer, torch.nn.Linear):
            broken.append(f"R9: {path} is not a linear layer of the model")
            continue
        expected = (r, layer.in_features) if part == "lora_A" else (layer.out_features, r)
        if tuple(tensor.shape) != expected:
            broken.append(f"R6/R9: {name} has shape {tuple(tensor.shape)}, not {expected}")
    return broken


def vllm_violations(folder: Path, max_lora_rank: int, model: torch.nn.Module) -> list[str]:
    """Every rule above that ``folder`` breaks for a server started with ``max_lora_rank``."""
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    return _config_rules(config, max_lora_rank) + _tensor_rules(tensors, config.get("r", 0), model)


def vllm_scale(config: dict) -> float:
    """R6: the one scale vLLM applies (``PEFTHelper.__post_init__``)."""
    root = math.sqrt(config["r"]) if config.get("use_rslora") else config["r"]
    return config["lora_alpha"] / root


@pytest.mark.parametrize("kind", EXPORTS)
def test_every_exported_folder_passes_vllms_rules(kind):
    done = exported(kind)
    assert vllm_violations(done.folder, done.r, tiny_llama()) == []
    config = json.loads((done.folder / "adapter_config.json").read_text())
    assert vllm_scale(config) == 1.0  # every module's own scale is in its lora_B
    assert set(config["target_modules"]) == set(done.modules)


def _broken_copy(source: Path, target: Path, config_change=None, tensor_change=None) -> Path:
    shutil.copytree(source, target)
    config = json.loads((target / "adapter_config.json").read_text())
    if config_change:
        config_change(config)
    (target / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(target / "adapter_model.safetensors")
    if tensor_change:
        tensor_change(tensors)
    save_file(tensors, str(target / "adapter_model.safetensors"))
    return target


def _first_a(tensors: dict) -> str:
    return next(k for k in sorted(tensors) if k.endswith("lora_A.weight"))


BREAKS = {
    "R1": dict(config_change=lambda c: c.pop("target_modules")),
    "R2": dict(config_change=lambda c: c.update(modules_to_save=["lm_head"])),
    "R3": dict(config_change=lambda c: c.update(use_dora=True)),
    "R4": dict(config_change=lambda c: c.update(r=16)),
    "R5": dict(config_change=lambda c: c.update(bias="lora_only")),
    "R6": dict(config_change=lambda c: c.update(rank_pattern={"q_proj": 4})),
    "R7": dict(config_change=lambda c: c.update(r=4)),
    "R8": dict(tensor_change=lambda t: t.update({"base_model.model.lm_head.bias": torch.zeros(3)})),
    "R9": dict(tensor_change=lambda t: t.update({_first_a(t): t[_first_a(t)][:4].clone()})),
}


@pytest.mark.parametrize("rule", sorted(BREAKS))
def test_the_rules_catch_a_folder_that_breaks_them(rule, tmp_path):
    """Each rule bites: a copy of a good folder with one thing broken is caught by that rule."""
    done = exported("lora")  # r = 8
    broken = _broken_copy(done.folder, tmp_path / rule, **BREAKS[rule])
    found = vllm_violations(broken, 8, tiny_llama())
    assert any(f"{rule}" in line for line in found), found
