"""Several named adapters of every kind in one graph: IA3 and adaption prompts honour the adapter
name as LoRA does (own parameters, own gate), merge folds only the active ones, save/load uses
PEFT's keys, and a failing ``add_adapter`` leaves the graph exactly as it was."""

import pytest
import torch
from safetensors.torch import load_file

import fxpeft
from conftest import emitted_base, randomize_adapters, tiny_llama, token_batch
from fxpeft.graph.params import adapter_component
import dataclasses

from fxpeft.errors import FxpeftError, PassError
from fxpeft import registry

COMPONENTS = {"lora_A", "lora_B", "ia3_l", "adaption_prompt", "adaption_gate"}


def single(rules, seed, **overrides):
    """A graph holding one (default) adapter with random weights."""
    gm = fxpeft.rewrite(tiny_llama(), rules, **overrides)
    randomize_adapters(gm, seed)
    return gm.eval()


def copy_adapter(source, target, adapter):
    """``source``'s default-adapter tensors into ``target``'s ``adapter``."""
    state = target.state_dict()
    with torch.no_grad():
        for name, tensor in fxpeft.adapter_state_dict(source).items():
            ours = ".".join(adapter_component(p, adapter) if p in COMPONENTS else p
                            for p in name.split("."))
            state[ours].copy_(tensor)


def logits(gm, ids):
    with torch.no_grad():
        return gm(ids).logits


def assert_same(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def two_adapters(first_rules, second_rules, second="b", first_kw=None, second_kw=None):
    first, other = single(first_rules, 1, **(first_kw or {})), single(second_rules, 2, **(second_kw or {}))
    gm = fxpeft.rewrite(tiny_llama(), first_rules, **(first_kw or {}))
    gm.add_adapter(second, second_rules, **(second_kw or {}))
    copy_adapter(first, gm, "default")
    copy_adapter(other, gm, second)
    return gm.eval(), first, other


@pytest.fixture(scope="module")
def lora_ia3():
    return two_adapters("lora_qv", "ia3.toml", "scale", {"dropout": 0.0})


@pytest.fixture(scope="module")
def ids():
    return token_batch()


@pytest.fixture(scope="module")
def base_logits(ids):
    return logits(tiny_llama(), ids)


def check_switching(gm, first, second, name, ids, base_logits):
    assert gm.adapter_names == ["default", name] and gm.active_adapters == ["default"]
    assert_same(logits(gm, ids), logits(first, ids))
    gm.set_adapter(name)
    assert_same(logits(gm, ids), logits(second, ids))
    with gm.disable_adapters():
        assert_same(logits(gm, ids), base_logits)
    assert gm.active_adapters == [name]
    gm.set_adapter("default")


def check_delete(gm, first, ids):
    gm.delete_adapter("b")
    assert gm.adapter_names == ["default"]
    assert [n for n, _ in gm.named_parameters()] == [n for n, _ in first.named_parameters()]
    assert_same(logits(gm, ids), logits(first, ids))


def test_lora_and_ia3_in_one_graph(lora_ia3, ids, base_logits):
    gm, lora, scale = lora_ia3
    assert {n for n, _ in gm.named_parameters() if "ia3_l" in n} == {
        f"model.layers.{i}.{m}.ia3_l_scale" for i in (0, 1)
        for m in ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")}
    check_switching(gm, lora, scale, "scale", ids, base_logits)


def test_two_ia3_adapters(ids, base_logits):
    gm, first, second = two_adapters("ia3.toml", "ia3.toml")
    assert sum("ia3_l" in n for n, _ in gm.named_parameters()) == 12
    check_switching(gm, first, second, "b", ids, base_logits)
    check_delete(gm, first, ids)


def test_two_adaption_prompt_adapters(ids, base_logits):
    gm, first, second = two_adapters("llama_adapter.toml", "llama_adapter.toml",
                                     second_kw={"adapter_len": 3})
    shapes = {n: tuple(p.shape) for n, p in gm.named_parameters() if "adaption" in n}
    assert shapes["model.layers.1.self_attn.adaption_prompt_b"] == (1, 3, 64)
    assert shapes["model.layers.1.self_attn.adaption_gate_b"] == (1,)
    assert "model.layers.1.self_attn.adaption_prompt" in shapes
    check_switching(gm, first, second, "b", ids, base_logits)
    check_delete(gm, first, ids)


def test_named_ia3_saves_peft_keys_and_loads_under_another_name(lora_ia3, ids, tmp_path):
    gm, _, scale = lora_ia3
    folder = fxpeft.save(gm, tmp_path / "scale", adapter="scale")
    keys = set(load_file(str(folder / "adapter_model.safetensors")))
    assert len(keys) == 6 and all(k.startswith("base_model.model.") and k.endswith(".ia3_l") for k in keys)
    fresh = fxpeft.load(fxpeft.rewrite(tiny_llama(), "lora_qv"), folder, adapter="other")
    assert fresh.adapter_names == ["default", "other"]
    fresh.set_adapter("other")
    assert_same(logits(fresh, ids), logits(scale, ids))
    alone = fxpeft.load(tiny_llama(), folder, adapter="solo")
    assert alone.adapter_names == ["solo"]
    assert_same(logits(alone, ids), logits(scale, ids))


def test_named_prompt_saves_peft_keys_and_loads_under_another_name(ids, tmp_path):
    prompt = single("llama_adapter.toml", 5)
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv")
    gm.add_adapter("p", "llama_adapter.toml")
    copy_adapter(prompt, gm, "p")
    folder = fxpeft.save(gm, tmp_path / "p", adapter="p")
    keys = load_file(str(folder / "adapter_model.safetensors"))
    assert {k.rsplit(".", 1)[1] for k in keys} == {"adaption_prompt", "adaption_gate"}
    loaded = fxpeft.load(tiny_llama(), folder, adapter="q")
    assert_same(logits(loaded, ids), logits(prompt, ids))


def test_merge_folds_only_active_ia3(lora_ia3, ids):
    gm, _, _ = lora_ia3
    base_nodes = len(emitted_base(tiny_llama()).graph.nodes)
    try:
        for active in ("scale", ["default", "scale"]):
            gm.set_adapter(active)
            merged = fxpeft.merge(gm)
            assert len(merged.graph.nodes) == base_nodes
            assert not any("ia3_l" in n or "lora_" in n for n, _ in merged.named_parameters())
            torch.testing.assert_close(logits(merged, ids), logits(gm, ids), rtol=0, atol=1e-5)
        gm.set_adapter("scale")
        with torch.no_grad():
            gm.fxpeft_gates.scale.fill_(0.5)
        with pytest.raises(FxpeftError, match="partly open gate"):
            fxpeft.merge(gm)
    finally:
        gm.set_adapter("default")


def test_merge_of_a_traced_module_drops_every_ia3_vector():
    from fxpeft.rules import Rule, Where
    from fxpeft.kinds.ia3 import IA3Params
    rule = Rule(where=Where(path=["^0$"]), params=IA3Params())
    gm = fxpeft.rewrite(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)), rule)
    gm.add_adapter("b", rule)
    randomize_adapters(gm)
    x = torch.randn(5, 3)
    for active in ("default", "b"):
        gm.set_adapter(active)
        merged = fxpeft.merge(gm)
        assert [n for n, _ in merged.named_parameters()] == ["0.weight", "0.bias", "1.weight", "1.bias"]
        torch.testing.assert_close(merged(x), gm(x), rtol=0, atol=1e-6)
    gm.set_adapter("default")


def test_merge_of_ia3_drops_inactive_adapters(ids):
    gm, first, second = two_adapters("ia3.toml", "ia3.toml")
    gm.set_adapter("b")
    merged = fxpeft.merge(gm)
    assert not any("ia3_l" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, ids), logits(second, ids), rtol=0, atol=1e-5)


def snapshot(gm):
    return (gm.code, gm.adapter_names, gm.active_adapters, [n for n, _ in gm.named_parameters()],
            [n for n, _ in gm.named_buffers()], list(gm.state_dict()), len(gm.graph.nodes))


def test_failed_add_adapter_leaves_the_graph_as_it_was(monkeypatch, ids):
    gm = single("lora_qv", 3)
    before, out = snapshot(gm), logits(gm, ids)
    kind, calls = registry.get("ia3"), []

    def third_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise PassError("injected failure")
        return kind.splice(*args, **kwargs)

    monkeypatch.setitem(registry._KINDS, "ia3", dataclasses.replace(kind, splice=third_fails))
    with pytest.raises(PassError, match="pass 'ia3' failed: injected failure"):
        gm.add_adapter("b", "ia3.toml")
    assert len(calls) == 3 and snapshot(gm) == before
    gm.graph.lint()
    assert_same(logits(gm, ids), out)
    monkeypatch.undo()
    gm.add_adapter("b", "ia3.toml")  # the graph's index is still valid: a retry works
    assert gm.adapter_names == ["default", "b"]
    assert_same(logits(gm, ids), out)


def test_switching_every_kind_in_inference_mode_under_torch_compile_never_recompiles(ids):
    from torch._dynamo.testing import CompileCounter
    from torch._dynamo.utils import counters
    gm = single("lora_qv", 5)
    gm.add_adapter("scale", "ia3.toml")
    gm.add_adapter("prompt", "llama_adapter.toml")
    randomize_adapters(gm, 6)
    expected = {}
    for name in gm.adapter_names:
        gm.set_adapter(name)
        expected[name] = logits(gm, ids)
    torch._dynamo.reset()
    counters.clear()
    backend = CompileCounter()
    compiled = torch.compile(gm, backend=backend, dynamic=True)
    with torch.no_grad():
        gm.set_adapter("default", inference_mode=True)
        torch.testing.assert_close(compiled(ids).logits, expected["default"], rtol=0, atol=1e-5)
        frames = backend.frame_count
        for name in ["scale", "prompt", "default"]:
            gm.set_adapter(name, inference_mode=True)
            torch.testing.assert_close(compiled(ids).logits, expected[name], rtol=0, atol=1e-5)
        with gm.disable_adapters():
            torch.testing.assert_close(compiled(ids).logits, tiny_llama()(ids).logits, rtol=0, atol=1e-5)
    assert frames > 0 and backend.frame_count == frames and sum(counters["recompiles"].values()) == 0
