"""Adaption prompts (LLaMA-Adapter): identity at init, graph shape, PEFT parity both ways."""

import collections

import pytest
import torch

import fxpeft
from conftest import (emitted_base, token_batch, tiny_gemma, tiny_llama, tiny_mistral, tiny_opt, tiny_qwen2,
                      tiny_qwen3)
from fxpeft.rules import Rule, Where
from fxpeft.kinds.adaption_prompt import AdaptionPromptParams
from fxpeft.graph.gates import GATE_META
from fxpeft.names import ADAPTER_META
from peft_io import load_into, peft_adapted, save_from

aten = torch.ops.aten
BUILDERS = {"llama": tiny_llama, "mistral": tiny_mistral, "qwen2": tiny_qwen2, "qwen3": tiny_qwen3,
            "gemma": tiny_gemma, "opt": tiny_opt}


def _set_adapter(gm, seed=3, gate=0.7):
    """Random prompts and a non-zero gate, so the adapter changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if name.endswith("adaption_prompt"):
                param.copy_(torch.randn(param.shape, generator=generator))
            elif name.endswith("adaption_gate"):
                param.fill_(gate)


@pytest.mark.parametrize("family", BUILDERS)
def test_identity_at_init_and_live_after(family):
    model = BUILDERS[family]()
    gm = fxpeft.rewrite(model, "llama_adapter.toml")
    ids = token_batch()
    base = model(ids).logits
    torch.testing.assert_close(gm(ids).logits, base, rtol=0, atol=0)
    _set_adapter(gm)
    assert (gm(ids).logits - base).abs().max() > 1e-3


def _adapter_nodes_by_layer(gm):
    found = collections.defaultdict(collections.Counter)
    for node in gm.graph.nodes:
        if ADAPTER_META in node.meta:
            kind = str(node.target) if node.op == "call_function" else node.op
            found[node.meta[ADAPTER_META].module_path][kind] += 1
    return found


def _base_nodes_by_module(gm):
    return collections.Counter(list(n.meta["nn_module_stack"].values())[-1][0]
                               for n in gm.graph.nodes
                               if n.meta.get("nn_module_stack") and ADAPTER_META not in n.meta)


def test_graph_gets_one_branch_per_matched_layer_and_nothing_elsewhere():
    model = tiny_llama(num_hidden_layers=3)
    base = emitted_base(model)
    gm = fxpeft.rewrite(model, "llama_adapter.toml")
    gm.graph.lint()
    by_layer = _adapter_nodes_by_layer(gm)
    assert sorted(by_layer) == ["model.layers.1.self_attn", "model.layers.2.self_attn"]
    for counts in by_layer.values():  # 2 k/v projections, q@k^T and p@v, one softmax, one add
        assert counts["aten.linear.default"] == 2 and counts["aten.matmul.default"] == 2
        assert counts["aten.softmax.int"] == 1 and counts["aten.add.Tensor"] == 1
        assert counts["get_attr"] == 2  # prompt and gate
        assert counts["aten.unflatten.int"] == 4  # k heads, v heads, GQA group and ungroup
        assert not any(name.startswith("aten.scaled_dot_product") for name in counts)
    assert _base_nodes_by_module(gm) == _base_nodes_by_module(base)  # layer 0 untouched too
    added = sum(sum(c.values()) for c in by_layer.values())
    gates = [n for n in gm.graph.nodes if GATE_META in n.meta]  # per layer: read, per sample, times
    per_sample = 2  # once per graph: the adapter_names input and the Gates call
    assert len(gates) == 2 * 3
    assert len(gm.graph.nodes) == len(base.graph.nodes) + added + len(gates) + per_sample


def test_query_is_reused_not_recomputed():
    gm = fxpeft.rewrite(tiny_llama(), "llama_adapter.toml")
    q_linears = [n for n in gm.graph.nodes if n.target == aten.linear.default
                 and "q_proj" in str(n.args[1])]
    assert len(q_linears) == 2  # one per layer, the base's own
    o_linears = [n for n in gm.graph.nodes if n.target == aten.linear.default
                 and "o_proj" in str(n.args[1])]
    assert len(o_linears) == 2


def test_parameters_are_named_as_peft_and_only_they_train():
    gm = fxpeft.rewrite(tiny_llama(), "llama_adapter.toml", adapter_len=5)
    trainable = {n: tuple(p.shape) for n, p in gm.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.self_attn.{name}": shape for i in (0, 1)
                         for name, shape in (("adaption_prompt", (1, 5, 64)), ("adaption_gate", (1,)))}
    assert all(float(p.detach()) == 0 for n, p in gm.named_parameters() if n.endswith("gate"))
    gm(token_batch(), labels=token_batch()).loss.backward()
    grads = {n for n, p in gm.named_parameters() if p.grad is not None}
    assert grads == set(trainable)


def test_eager_and_sdpa_forms_agree():
    ids = token_batch()
    sdpa = fxpeft.rewrite(tiny_llama(), "llama_adapter.toml")
    eager = fxpeft.rewrite(tiny_llama(attn_implementation="eager"), "llama_adapter.toml")
    _set_adapter(sdpa)
    _set_adapter(eager)
    torch.testing.assert_close(eager(ids).logits, sdpa(ids).logits, rtol=0, atol=1e-5)


def test_tanh_gate_is_identity_at_init_and_squashes():
    model, ids = tiny_llama(), token_batch()
    plain = fxpeft.rewrite(model, "llama_adapter.toml")
    tanh = fxpeft.rewrite(model, "llama_adapter.toml", gate="tanh")
    torch.testing.assert_close(tanh(ids).logits, model(ids).logits, rtol=0, atol=0)
    _set_adapter(plain, gate=float(torch.tanh(torch.tensor(0.7))))
    _set_adapter(tanh, gate=0.7)
    torch.testing.assert_close(tanh(ids).logits, plain(ids).logits, rtol=0, atol=1e-6)


def test_layers_and_params_come_from_the_rule():
    rule = Rule(match="attention", where=Where(layers=[0]), params=AdaptionPromptParams(adapter_len=3))
    gm = fxpeft.rewrite(tiny_llama(), rule)
    assert [n for n, _ in gm.named_parameters() if "adaption" in n] == [
        "model.layers.0.self_attn.adaption_prompt", "model.layers.0.self_attn.adaption_gate"]


def test_first_match_wins_adapts_each_layer_once():
    rules = [Rule(match="attention", params=AdaptionPromptParams()),
             Rule(match="attention", where=Where(layers=[1]), params=AdaptionPromptParams(),
                  optional=True)]
    gm = fxpeft.rewrite(tiny_llama(), rules)  # first match wins: layer 1 is adapted once
    assert sum("adaption_gate" in n for n, _ in gm.named_parameters()) == 2


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_peft_adapter_loads_into_fxpeft_with_equal_logits(family, tmp_path):
    ids = token_batch()
    peft_model = peft_adapted(BUILDERS[family](), "adaption_prompt")
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if name.endswith("adaption_gate"):
                param.fill_(0.6)
    peft_model.save_pretrained(tmp_path)
    expected = peft_model(input_ids=ids).logits
    gm = load_into(BUILDERS[family](), tmp_path)
    assert sum("adaption_prompt" in n for n, _ in gm.named_parameters()) == 2
    torch.testing.assert_close(gm(ids).logits, expected, rtol=0, atol=1e-5)
    assert (expected - BUILDERS[family]()(ids).logits).abs().max() > 1e-3  # the adapter mattered


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_fxpeft_adapter_loads_into_peft_with_equal_logits(family, tmp_path):
    ids = token_batch()
    gm = fxpeft.rewrite(BUILDERS[family](), "llama_adapter.toml")
    _set_adapter(gm, seed=5, gate=-0.4)
    save_from(gm, tmp_path)
    from peft import PeftModel
    peft_model = PeftModel.from_pretrained(BUILDERS[family](), tmp_path).eval()
    torch.testing.assert_close(peft_model(input_ids=ids).logits, gm(ids).logits, rtol=0, atol=1e-5)
