"""Fuse and clean-up passes: each keeps outputs and gradients equal to the unfused graph, and
does its job in the graph."""

import itertools

import pytest
import torch

import fxpeft
from conftest import (adapter_nodes, loss_and_grads, nodes_with_target, nodes_with_target_anywhere,
                      randomize_adapters, saved_bytes, tiny_gemma, tiny_gpt2, tiny_llama, tiny_opt,
                      tiny_qwen2, token_batch)
from fxpeft.names import adapter_node
from fxpeft.transforms.activations import gelu_and_mul, silu_and_mul
from fxpeft.transforms.causal_mask import masked_or_causal_sdpa
from fxpeft.transforms.checkpoint import CHECKPOINT_MODULE, CheckpointedRegion
from fxpeft.transforms.norms import rms_norm_then_down

aten = torch.ops.aten
PASSES = ("drop_inactive", "fold_lora_scale", "share_input_casts", "fuse_lora_a", "fuse_lm_loss", "sdpa_gqa",
          "causal_mask", "fp32_short_attention", "gated_activation", "recompute_norms", "strip_leftovers",
          "onednn_linear")


def lora_graph(rules="lora_all_linear", **overrides):
    gm = fxpeft.rewrite(tiny_llama(), rules, dropout=0.0, **overrides)
    randomize_adapters(gm)
    return gm


def outputs_and_grads(gm, ids, labels=None, **kwargs):
    """Eval logits, then the train loss and gradients."""
    with torch.no_grad():
        logits = gm.eval()(ids).logits
    gm.zero_grad(set_to_none=True)
    loss = gm.train()(ids, labels=ids if labels is None else labels, **kwargs).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in gm.named_parameters() if p.grad is not None}
    gm.zero_grad(set_to_none=True)
    return (logits, loss.detach()), grads


def assert_equivalent(gm, fused, ids, **kwargs):
    (outputs, grads), (fused_outputs, fused_grads) = (outputs_and_grads(gm, ids, **kwargs),
                                                      outputs_and_grads(fused, ids, **kwargs))
    assert grads
    for ours, theirs in zip(fused_outputs, outputs):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert grads.keys() == fused_grads.keys()
    for name in grads:
        torch.testing.assert_close(fused_grads[name], grads[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("only", PASSES)
def test_each_pass_alone_keeps_outputs_and_gradients(only):
    gm = lora_graph()
    gm.add_adapter("idle", "lora_qv", dropout=0.0)
    randomize_adapters(gm, seed=2)
    fused = fxpeft.fuse(gm, skip=tuple(p for p in PASSES if p != only))
    fused.graph.lint()
    assert_equivalent(gm, fused, token_batch())


def test_the_passes_do_their_jobs_in_the_graph():
    gm = lora_graph()
    gm.add_adapter("idle", "lora_qv", dropout=0.0)
    fused = fxpeft.fuse(gm)
    kept = {adapter_node(n).adapter for n in fused.graph.nodes if adapter_node(n)}
    assert kept == {"default"}  # the idle adapter's nodes are gone
    scale_muls = [n for n in adapter_nodes(fused) if n.target == aten.mul.Tensor
                  and isinstance(n.args[1], float)]
    assert scale_muls == []  # folded onto the gates
    downs = [n for n in nodes_with_target(fused, aten.linear.default) + nodes_with_target(fused, rms_norm_then_down)
             if n.args[-1].op == "call_function" and n.args[-1].target == aten.cat.default]
    # per layer: q/k/v read one tensor, gate/up another
    assert len(downs) == 2 * 2 and len(nodes_with_target(fused, aten.split_with_sizes.default)) == 4
    assert len(nodes_with_target(fused, aten.to.dtype)) < len(nodes_with_target(gm, aten.to.dtype))
    assert len(fused.graph.nodes) < len(gm.graph.nodes)


def test_the_specialised_graph_equals_the_gated_one_for_every_active_set():
    """Every kind takes part: LoRA, DoRA, IA3 and adaption prompts."""
    gm = lora_graph("lora_qv")
    gm.add_adapter("b", "dora_qv", dropout=0.0)
    gm.add_adapter("c", "ia3.toml")
    gm.add_adapter("d", "llama_adapter.toml")
    randomize_adapters(gm, seed=3)
    ids = token_batch()
    for count in (1, 2, 3, 4):
        for active in itertools.combinations(["default", "b", "c", "d"], count):
            gm.set_adapter(list(active))
            with torch.no_grad():
                expected = gm.eval()(ids).logits
                fused = fxpeft.fuse(gm).eval()
                torch.testing.assert_close(fused(ids).logits, expected, rtol=0, atol=1e-5)
            kept = {adapter_node(n).adapter for n in fused.graph.nodes if adapter_node(n)}
            assert kept == set(active)
    gm.set_adapter("default")


def test_a_specialised_copy_refuses_an_adapter_it_dropped_and_fewer_are_fine():
    """Switching to an adapter whose nodes ``drop_inactive`` removed would silently leave it
    out: the copy refuses, eager and compiled, until fused again; a mixed copy keeps every one."""
    gm = lora_graph("lora_qv")
    gm.add_adapter("b", "lora_qv", dropout=0.0)
    randomize_adapters(gm, seed=4)
    ids = token_batch()
    fused, mixed = fxpeft.fuse(gm).eval(), fxpeft.fuse(gm, mixed=True).eval()
    compiled = torch.compile(fused)
    with torch.no_grad():
        compiled(ids)
        with gm.disable_adapters():  # fewer active adapters: closed gates add zeros
            torch.testing.assert_close(fused(ids).logits, gm.eval()(ids).logits, rtol=0, atol=1e-5)
        gm.set_adapter("b")
        for runs in (fused, compiled):
            with pytest.raises(fxpeft.FxpeftError, match=r"holds only adapters \['default'\].*'b' is active"):
                runs(ids)
        expected = gm(ids).logits
        torch.testing.assert_close(mixed(ids).logits, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(fxpeft.fuse(gm).eval()(ids).logits, expected, rtol=0, atol=1e-5)
        unspecialised = fxpeft.fuse(gm, skip=("drop_inactive",)).eval()
        gm.set_adapter("default")
        torch.testing.assert_close(unspecialised(ids).logits, gm(ids).logits, rtol=0, atol=1e-5)


def test_a_fused_copy_is_cached_per_active_set_and_compiles_once_per_set():
    from torch._dynamo.testing import CompileCounter
    gm = lora_graph("lora_qv").eval()
    gm.add_adapter("b", "lora_qv", dropout=0.0)
    randomize_adapters(gm, seed=5)
    ids, counter, copies = token_batch(), CompileCounter(), {}
    with torch.no_grad():
        for active in ("default", "b", "default", "b"):
            gm.set_adapter(active)
            fused = fxpeft.fuse(gm)
            assert copies.setdefault(active, fused) is fused  # switching back: the same copy
            torch.testing.assert_close(torch.compile(fused, backend=counter)(ids).logits, gm(ids).logits,
                                       rtol=0, atol=1e-5)
    assert counter.frame_count == 2  # once per active set
    assert fxpeft.fuse(gm, mixed=True) is fxpeft.fuse(gm, mixed=True)
    mixed = fxpeft.fuse(gm, mixed=True)
    gm.set_adapter("default")
    assert fxpeft.fuse(gm, mixed=True) is mixed  # it keeps every adapter: not per set
    assert fxpeft.fuse(gm, skip=("fuse_lora_a",)) is not copies["default"]  # other options
    gm.add_adapter("c", "lora_qv", dropout=0.0)  # the graph changed: a new copy
    gm.set_adapter(["default", "c"])
    with_c = fxpeft.fuse(gm)
    assert with_c is not copies["default"]
    assert {adapter_node(n).adapter for n in with_c.graph.nodes if adapter_node(n)} == {"default", "c"}
    gm.set_adapter("default")
    gm.delete_adapter("c")
    with torch.no_grad():
        torch.testing.assert_close(fxpeft.fuse(gm)(ids).logits, gm(ids).logits, rtol=0, atol=1e-5)
    before = fxpeft.fuse(gm)
    gm.double()  # converted: new buffers, so a new copy, which runs in float64
    assert fxpeft.fuse(gm) is not before
    with torch.no_grad():
        assert fxpeft.fuse(gm)(ids).logits.dtype == torch.float64


def test_frozen_base_linears_run_on_onednn_and_adapter_linears_do_not():
    from fxpeft.transforms.cpu_gemm import _onednn
    if not _onednn():
        pytest.skip("this torch has no oneDNN (mkldnn) CPU GEMM")
    gm = lora_graph("lora_qv")
    fused = fxpeft.fuse(gm)
    frozen = nodes_with_target(fused, torch.ops.fxpeft.frozen_linear.default)
    weights = [n.args[1].target for n in frozen]
    # 7 base linears in each of 2 layers; lm_head is inside the fused loss
    assert len(frozen) == 14 and not any("lora" in w for w in weights)
    assert all(not fused.get_parameter(w).requires_grad for w in weights)
    assert all("lora" in n.args[1].target for n in nodes_with_target(fused, aten.linear.default))
    assert_equivalent(gm, fused, token_batch())
    fused.get_parameter(weights[0]).requires_grad_(True)  # unfrozen after fusing: refused, not wrong
    with pytest.raises(fxpeft.FxpeftError, match="now requires grad; fuse again"):
        fused.train()(token_batch(), labels=token_batch())
    fused.get_parameter(weights[0]).requires_grad_(False)


def test_shared_dropout_is_opt_in():
    gm = fxpeft.rewrite(tiny_llama(), "lora_all_linear")  # dropout 0.05 per branch
    assert not nodes_with_target(fxpeft.fuse(gm), aten.split_with_sizes.default)
    shared = fxpeft.fuse(gm, shared_dropout=True)
    assert len(nodes_with_target(shared, aten.split_with_sizes.default)) == 4
    ids = token_batch()
    gm.eval(), shared.eval()
    with torch.no_grad():
        torch.testing.assert_close(shared(ids).logits, gm(ids).logits, rtol=0, atol=1e-5)


def test_fused_copies_share_parameters_and_refuse_new_adapters(tmp_path):
    gm = lora_graph("lora_qv")
    fused = fxpeft.fuse(gm)
    assert fused.get_parameter("model.layers.0.self_attn.q_proj.lora_A.weight") is \
        gm.get_parameter("model.layers.0.self_attn.q_proj.lora_A.weight")
    with pytest.raises(fxpeft.FxpeftError, match="fused copy"):
        fused.add_adapter("x", "lora_qv")
    with pytest.raises(ValueError, match="no pass"):
        fxpeft.fuse(gm, skip=("fold_scale",))
    assert (fxpeft.save(fused, tmp_path / "a") / "adapter_model.safetensors").is_file()


def test_the_fused_lm_loss_is_exact_and_never_makes_the_logits():
    gm = lora_graph("lora_qv")
    fused = fxpeft.fuse(gm, skip=tuple(p for p in PASSES if p != "fuse_lm_loss"))
    assert len(nodes_with_target(fused, aten.linear.default)) == len(nodes_with_target(gm, aten.linear.default)) - 1
    ids = token_batch(3, 11)
    labels = ids.clone()
    labels[0, :4] = -100  # ignore_index honoured
    assert_equivalent(gm, fused, ids)
    for kwargs in ({"num_items_in_batch": torch.tensor(17)}, {}):
        assert_equivalent(gm, fused, ids, labels=labels, **kwargs)
    out = fused.train()(ids, labels=ids)
    assert out.logits is None and out.loss.dim() == 0
    assert fused.eval()(ids, labels=ids).logits.shape == (3, 11, 128)  # eval: logits as before


def test_the_lm_loss_is_not_fused_where_it_would_not_be_exact():
    adapted_head = fxpeft.rewrite(tiny_llama(), "lora_all_linear", dropout=0.0)
    head = fxpeft.rewrite(tiny_llama(), fxpeft.rules.Rule(where=fxpeft.rules.Where(path=["lm_head"])))
    for gm in (head, fxpeft.rewrite(tiny_llama().half(), "lora_qv")):  # bf16: test_bf16_fuse.py
        assert not hasattr(fxpeft.fuse(gm), "fxpeft_lm_loss")
    assert hasattr(fxpeft.fuse(adapted_head), "fxpeft_lm_loss")  # all-linear leaves the head out


def test_fused_graph_compiles_fullgraph_forward_and_backward():
    gm = lora_graph()
    fused = fxpeft.fuse(gm)
    torch._dynamo.reset()
    compiled = torch.compile(fused, fullgraph=True, dynamic=True)
    ids = token_batch()
    loss = compiled(ids, labels=ids).loss
    loss.backward()
    torch.testing.assert_close(loss, gm.train()(ids, labels=ids).loss, rtol=0, atol=1e-5)
    torch._dynamo.reset()


def test_the_fused_training_graph_compiles_whole_and_cacheable():
    """In train mode with labels (the fused LM-head loss) under ``fullgraph=True``: no graph
    break, and no ``autograd.Function`` in the traced graph (AOTAutograd does not cache a graph
    that holds one, so every process would compile it afresh); loss and adapter gradients equal
    eager's."""
    gm = lora_graph()
    randomize_adapters(gm)
    fused = fxpeft.fuse(gm).train()
    ids = token_batch()
    expected_loss, expected = loss_and_grads(fused, {"input_ids": ids, "labels": ids})
    traced = []

    def recording(graph_module, example_inputs):
        traced.append(graph_module)
        return graph_module.forward
    torch._dynamo.reset()
    compiled = torch.compile(fused, fullgraph=True, backend=recording)
    loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad for n, p in fused.named_parameters() if p.grad is not None}
    torch._dynamo.reset()
    assert len(traced) == 1
    targets = {str(getattr(n.target, "__name__", n.target)) for n in traced[0].graph.nodes}
    assert "autograd_function_apply" not in targets
    assert any("chunked_linear_cross_entropy" in t for t in targets)
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=1e-5)
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], rtol=0, atol=1e-5)


def test_mixed_fusion_gathers_each_sites_adapters_and_keeps_every_row():
    gm = lora_graph("lora_qv", adapter="a")
    gm.add_adapter("b", "lora_qv", dropout=0.0, r=4)  # ranks may differ
    gm.add_adapter("c", "lora_all_linear", dropout=0.0)
    randomize_adapters(gm, seed=7)
    mixed = fxpeft.fuse(gm, mixed=True)
    calls = [n for n in mixed.graph.nodes if n.op == "call_function" and n.target.__name__ == "mixed_lora"]
    assert len(calls) == 2 * 2  # q and v of each layer hold three adapters; the rest only c
    ids = token_batch(4, 9)
    names = ["a", "__base__", "c", "b"]
    with torch.no_grad():
        expected = gm.eval()(ids, adapter_names=names).logits
        torch.testing.assert_close(mixed.eval()(ids, adapter_names=names).logits, expected, rtol=0, atol=1e-5)
        for row, name in enumerate(names):  # each row as if run alone with its adapter
            gm.set_adapter(name) if name != "__base__" else None
            with gm.disable_adapters() if name == "__base__" else torch.no_grad():
                alone = gm(ids[row:row + 1]).logits
            torch.testing.assert_close(expected[row:row + 1], alone, rtol=0, atol=1e-5)
        gm.set_adapter("a")
        torch.testing.assert_close(mixed(ids).logits, gm(ids).logits, rtol=0, atol=1e-5)


LAYERS, TOKENS, HIDDEN, INTERMEDIATE, HEAD_DIM = 2, 3 * 11, 64, 128, 16  # tiny_llama, token_batch


def saved_bytes_dropped_by(gm, fuse_pass: str) -> int:
    """What ``fuse_pass`` saves: bytes autograd keeps for backward without it, minus with it."""
    ids = token_batch()
    batch = {"input_ids": ids, "labels": ids}
    return saved_bytes(fxpeft.fuse(gm, skip=(fuse_pass,)), batch) - saved_bytes(fxpeft.fuse(gm), batch)


def test_sdpa_reads_grouped_query_keys_and_values_without_repeat_kv():
    gm = lora_graph("lora_qv")
    fused = fxpeft.fuse(gm)
    attention = nodes_with_target(fused, masked_or_causal_sdpa)  # causal_mask's; its arguments are SDPA's
    assert len(attention) == LAYERS and all(n.kwargs["enable_gqa"] for n in attention)
    assert all(n.args[1].meta["val"].shape[1] == n.args[2].meta["val"].shape[1] == 2 for n in attention)
    assert [n for n in nodes_with_target(fused, aten.expand.default) if len(n.args[1]) == 5] == []
    # per layer, keys and values each keep 2 heads instead of 4
    assert saved_bytes_dropped_by(gm, "sdpa_gqa") == LAYERS * 2 * 2 * TOKENS * HEAD_DIM * 4
    multi_head = fxpeft.fuse(fxpeft.rewrite(tiny_llama(num_key_value_heads=4), "lora_qv", dropout=0.0))
    attention = nodes_with_target(multi_head, masked_or_causal_sdpa)
    assert len(attention) == LAYERS and not any(n.kwargs.get("enable_gqa") for n in attention)


@pytest.mark.parametrize("rules", ["lora_qv", "lora_all_linear"])
def test_gated_activations_keep_only_their_two_inputs(rules):
    gm = lora_graph(rules)
    fused = fxpeft.fuse(gm)
    assert len(nodes_with_target(fused, silu_and_mul)) == LAYERS
    assert nodes_with_target(fused, aten.silu.default) == []
    # per layer, silu(gate) is no longer kept beside gate and up
    assert saved_bytes_dropped_by(gm, "gated_activation") == LAYERS * TOKENS * INTERMEDIATE * 4


@pytest.mark.parametrize("rules,norms_per_layer", [("lora_qv", 1), ("lora_all_linear", 2)])
def test_norms_feeding_lora_a_are_recomputed_in_backward(rules, norms_per_layer):
    """Llama's fp32 RMSNorm and its A projection become one function that keeps the norm's
    input and per-row rsqrt."""
    gm = lora_graph(rules)
    fused = fxpeft.fuse(gm)
    calls = nodes_with_target(fused, rms_norm_then_down)
    assert len(calls) == LAYERS * norms_per_layer
    assert all(call.args[3].target == aten.cat.default for call in calls)  # the fused A weights
    assert not norm_regions(fused)
    # per norm, the normalised tensor is not kept; but the first layer's input needs no gradient,
    # so there only the norm's output was kept, and now its input is (the same size)
    kept_less = len(calls) - 1
    assert saved_bytes_dropped_by(gm, "recompute_norms") > 0.95 * kept_less * TOKENS * HIDDEN * 4
    checked = fxpeft.fuse(gm, checkpoint="layers")  # whole layers recompute: nothing to do here
    assert not nodes_with_target_anywhere(checked, rms_norm_then_down) and not norm_regions(checked)


def norm_regions(fused):
    return [m for name, m in fused.named_modules() if name.startswith(f"{CHECKPOINT_MODULE}.norm_")
            and isinstance(m, CheckpointedRegion)]


def test_other_norms_feeding_lora_a_are_recomputed_in_checkpointed_regions():
    """OPT's LayerNorm is no RMSNorm: it and the A projections run again under checkpoint."""
    gm = fxpeft.rewrite(tiny_opt(dropout=0.0, attention_dropout=0.0), "lora_all_linear", dropout=0.0)
    randomize_adapters(gm)
    fused = fxpeft.fuse(gm)
    regions = norm_regions(fused)
    assert len(regions) == 2 * 2  # per layer: before q/k/v, before fc1
    for region in regions:  # the norm and the A projection, and no parameter of their own
        assert not list(region.parameters())
        assert nodes_with_target(region.region, aten.layer_norm.default)
        assert nodes_with_target(region.region, aten.linear.default)
    assert_equivalent(gm, fused, token_batch())


def gpt2_without_dropout():
    return tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


@pytest.mark.parametrize("family", [tiny_gemma, gpt2_without_dropout, tiny_qwen2])
def test_memory_passes_keep_outputs_and_gradients_on_other_families(family):
    """Gemma (GeGLU), GPT-2 (LayerNorm feeding c_attn's LoRA, no gating), Qwen2 (GQA, biases)."""
    gm = fxpeft.rewrite(family(), "lora_all_linear", dropout=0.0)
    randomize_adapters(gm)
    fused = fxpeft.fuse(gm, skip=tuple(p for p in PASSES if p not in
                                       ("sdpa_gqa", "gated_activation", "recompute_norms")))
    fused.graph.lint()
    assert_equivalent(gm, fused, token_batch())
    if family is tiny_gemma:  # GeGLU, tanh-approximated
        assert [n.kwargs["approximate"] for n in nodes_with_target(fused, gelu_and_mul)] == ["tanh"] * LAYERS
