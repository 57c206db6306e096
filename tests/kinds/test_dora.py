"""DoRA: identity at init, the graph, PEFT parity both ways (Llama, GPT-2 Conv1D), merge,
named adapters, gradients, and torch.compile(fullgraph=True) forward and backward."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import fxpeft
from conftest import (adapter_nodes, assert_only_adapters_get_grads, emitted_base,
                      randomize_adapters, tiny_gpt2, tiny_llama, token_batch)
from fxpeft.kinds.dora import DoraParams
from fxpeft.rules import Rule, Where

ATOL = 1e-5
GPT2_RULE = Rule(where=Where(path=[r"c_attn$", r"attn\.c_proj$"]), params=DoraParams(r=4, alpha=8))
FAMILIES = {"llama": (tiny_llama, "dora_qv", dict(target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16)),
            "gpt2": (tiny_gpt2, GPT2_RULE, dict(target_modules=["c_attn", "attn.c_proj"], r=4,
                                                lora_alpha=8, fan_in_fan_out=True))}


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def dora_graph(family, **overrides):
    make, rules, _ = FAMILIES[family]
    gm = fxpeft.rewrite(make(), rules, dropout=0.0, **overrides)
    randomize_adapters(gm)
    with torch.no_grad():  # magnitudes near the weight norms, as after training
        for name, param in gm.named_parameters():
            if name.endswith("lora_magnitude_vector"):
                param.add_(1.0)
    return gm.eval()


def test_identity_at_init_and_the_graph():
    model = tiny_llama()
    gm = fxpeft.rewrite(model, "dora_qv")
    ids = token_batch()
    gm.eval()
    torch.testing.assert_close(logits(gm, ids), logits(model, ids), rtol=0, atol=1e-6)
    gm.graph.lint()
    joins = [n for n in adapter_nodes(gm, "dora") if n.meta["fxpeft_adapter"].removable]
    assert len(joins) == 4 and all(n.target == torch.ops.aten.add.Tensor for n in joins)
    norms = [n for n in adapter_nodes(gm, "dora") if n.target == torch.ops.aten.linalg_vector_norm.default]
    assert len(norms) == 4 and all(n.args[0].target == torch.ops.aten.detach.default for n in norms)
    magnitude = gm.get_parameter("model.layers.0.self_attn.q_proj.lora_magnitude_vector")
    torch.testing.assert_close(magnitude, model.model.layers[0].self_attn.q_proj.weight.norm(dim=1))


def test_perturbing_the_magnitude_scales_the_output_as_predicted():
    """With B = 0 the branch is ``(m / ||W|| - 1) * W x``: doubling m doubles the projection,
    which is the base model with that weight doubled."""
    model = tiny_llama()
    gm = fxpeft.rewrite(model, Rule(where=Where(path=[r"layers\.1\.self_attn\.v_proj$"]),
                                    params=DoraParams())).eval()
    with torch.no_grad():
        gm.get_parameter("model.layers.1.self_attn.v_proj.lora_magnitude_vector").mul_(2)
    doubled = tiny_llama()
    with torch.no_grad():
        doubled.model.layers[1].self_attn.v_proj.weight.mul_(2)
    ids = token_batch()
    assert (logits(doubled, ids) - logits(model, ids)).abs().max() > 1e-3
    torch.testing.assert_close(logits(gm, ids), logits(doubled, ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fxpeft_to_peft(tmp_path, family):
    make = FAMILIES[family][0]
    gm = dora_graph(family)
    folder = fxpeft.save(gm, tmp_path / "dora")
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    assert any(k.endswith(".lora_magnitude_vector") for k in tensors)
    assert len(tensors) == len(fxpeft.adapter_state_dict(gm))
    peft_model = PeftModel.from_pretrained(make(), str(folder)).eval()
    assert peft_model.peft_config["default"].use_dora
    ids = token_batch()
    torch.testing.assert_close(logits(peft_model, ids), logits(gm, ids), rtol=0, atol=ATOL)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_peft_to_fxpeft(tmp_path, family):
    make, _, config = FAMILIES[family]
    peft_model = get_peft_model(make(), LoraConfig(use_dora=True, **config))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(tmp_path / "peft")
    gm = fxpeft.load(make(), tmp_path / "peft")
    assert {k.kind for k in [n.meta["fxpeft_adapter"] for n in adapter_nodes(gm, "dora")]} == {"dora"}
    ids = token_batch()
    torch.testing.assert_close(logits(gm, ids), logits(peft_model.eval(), ids), rtol=0, atol=ATOL)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merge_equals_the_adapted_graph_and_has_the_base_ops(family):
    gm = dora_graph(family)
    merged = fxpeft.merge(gm)
    merged.graph.lint()
    base = emitted_base(FAMILIES[family][0]())
    assert len(merged.graph.nodes) == len(base.graph.nodes)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ids = token_batch()
    torch.testing.assert_close(logits(merged, ids), logits(gm, ids), rtol=0, atol=ATOL)


def test_gradients_reach_only_dora_parameters():
    gm = dora_graph("llama").train()
    ids = token_batch()
    gm(ids, labels=ids).loss.backward()
    assert_only_adapters_get_grads(gm)
    names = {n for n, p in gm.named_parameters() if p.requires_grad}
    assert names and all(n.rsplit(".", 2)[-2] in ("lora_A", "lora_B") or
                         n.endswith("lora_magnitude_vector") for n in names)


def test_named_adapters_switch_and_save_alone(tmp_path):
    gm = fxpeft.rewrite(tiny_llama(), "dora_qv", dropout=0.0)
    gm.add_adapter("other", "dora_qv", dropout=0.0)
    randomize_adapters(gm, seed=4)
    ids = token_batch()
    outputs = {}
    for name in ("default", "other"):
        gm.set_adapter(name)
        outputs[name] = logits(gm.eval(), ids)
    assert (outputs["default"] - outputs["other"]).abs().max() > 1e-3
    with gm.disable_adapters():
        torch.testing.assert_close(logits(gm, ids), logits(tiny_llama(), ids), rtol=0, atol=1e-6)
    folder = fxpeft.save(gm, tmp_path / "other", adapter="other")
    alone = fxpeft.load(tiny_llama(), folder)
    torch.testing.assert_close(logits(alone, ids), outputs["other"], rtol=0, atol=ATOL)
    gm.delete_adapter("other")
    assert not any("_other" in n for n, _ in gm.named_parameters())


def test_compiles_with_fullgraph_forward_and_backward():
    gm = dora_graph("llama").train()
    ids = token_batch()
    torch._dynamo.reset()
    compiled = torch.compile(gm, fullgraph=True, dynamic=True)
    loss = compiled(ids, labels=ids).loss
    loss.backward()
    compiled_grads = {n: p.grad.clone() for n, p in gm.named_parameters() if p.grad is not None}
    gm.zero_grad()
    gm(ids, labels=ids).loss.backward()
    assert compiled_grads.keys() == {n for n, p in gm.named_parameters() if p.grad is not None}
    for name, grad in compiled_grads.items():
        torch.testing.assert_close(grad, gm.get_parameter(name).grad, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()
