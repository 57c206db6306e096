"""Errors blame the right thing, in the right order (issue 24, item 2): what the folder needs is
compared with the model first (its modules), the JSON-vs-TOML consistency only after; each message
speaks of what the user holds. The model, the graph and the folder are unchanged after each."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fxpeft
from conftest import tiny_gpt2, tiny_llama
from fxpeft.io.serialize import restore


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def tensors_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in module.state_dict().items()}


def assert_same(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    state = module.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in state)


@pytest.mark.parametrize("rules", ["lora_all_linear.toml", "c_attn"])
def test_a_gpt2_folder_into_a_llama_says_the_folder_is_another_model_s(tmp_path, rules):
    """All-linear rules build on a Llama too (so the old error was fan_in_fan_out, with advice
    to delete fxpeft_rules.toml); rules naming c_attn match nothing there."""
    if rules == "c_attn":
        rules = fxpeft.rules.Rule(where=fxpeft.rules.Where(path=["c_attn$"]))
    folder = fxpeft.save(fxpeft.rewrite(tiny_gpt2(), rules), tmp_path / "gpt2")
    on_disk, llama = folder_bytes(folder), tiny_llama()
    before = tensors_of(llama)
    with pytest.raises(fxpeft.AdapterFileError) as err:
        fxpeft.load(llama, folder)
    message = str(err.value)
    assert message.startswith(f"{folder / 'adapter_model.safetensors'}: holds adapter weights for "
                              f"transformer.h.0.attn.c_attn"), message
    assert "LlamaForCausalLM has none of these modules: the folder was made for another model" in message
    assert "delete" not in message and "fan_in_fan_out" not in message
    assert_same(llama, before)
    assert folder_bytes(folder) == on_disk


def test_resuming_an_r8_checkpoint_into_an_r4_graph_says_the_file_says_8(tmp_path):
    folder = fxpeft.save(fxpeft.rewrite(tiny_llama(), "lora_qv.toml", r=8), tmp_path / "r8")
    on_disk = folder_bytes(folder)
    graph = fxpeft.rewrite(tiny_llama(), "lora_qv.toml", r=4)
    before = tensors_of(graph)
    with pytest.raises(fxpeft.AdapterFileError) as err:
        restore(graph, folder)
    assert str(err.value) == (
        f"{folder / 'adapter_config.json'}: says r = 8, but adapter 'default' of this graph has "
        f"r = 4; resume into a graph built as the folder says (fxpeft.load(model, folder) builds one)")
    assert_same(graph, before)
    assert folder_bytes(folder) == on_disk


def test_resuming_a_gpt2_checkpoint_into_a_llama_graph_blames_the_model(tmp_path):
    folder = fxpeft.save(fxpeft.rewrite(tiny_gpt2(), "lora_all_linear.toml"), tmp_path / "gpt2")
    graph = fxpeft.rewrite(tiny_llama(), "lora_all_linear.toml")
    before = tensors_of(graph)
    with pytest.raises(fxpeft.AdapterFileError, match="the folder was made for another model"):
        restore(graph, folder)
    assert_same(graph, before)


def test_a_stale_rules_file_is_still_named_once_the_folder_fits(tmp_path):
    """The consistency check still speaks when the folder is this model's."""
    import json
    folder = fxpeft.save(fxpeft.rewrite(tiny_llama(), "lora_qv.toml"), tmp_path / "qv")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(dict(config, lora_alpha=64)))
    with pytest.raises(fxpeft.AdapterFileError, match=r"says lora_alpha = 64, but "
                       r"fxpeft_rules.toml, saved with it, builds lora_alpha = 16 on this model"):
        fxpeft.load(tiny_llama(), folder)
