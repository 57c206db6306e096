"""Capture once and replicate (``fxpeft.capture.replicate``): a model is exported with the first and
last layer of each kind of layer only (its first and last where the layers are identical), and the
full graph is built by copying each kind's layer, in the model's order. The result must be the
graph a full export gives, node for node, and adapt and train the same; a model whose layers
cannot be shown alike (or are all of different kinds) is exported whole."""

import logging

import pytest
import torch

import fxpeft
from conftest import (graph_signature, randomize_adapters, tiny_gemma, tiny_gpt2, tiny_llama, tiny_mistral,
                      tiny_opt, tiny_qwen2, token_batch)
from fxpeft.capture import replicate
from fxpeft.generation import decode_graph
from fxpeft.graph.targets import fetch
from fxpeft.capture.export import capture

FAMILIES = {
    "llama_gqa": lambda: tiny_llama(num_hidden_layers=4),
    "qwen2": lambda: tiny_qwen2(num_hidden_layers=4),
    "qwen2_all_sliding": lambda: tiny_qwen2(num_hidden_layers=4, use_sliding_window=True,
                                            sliding_window=4, max_window_layers=0),
    "mistral": lambda: tiny_mistral(num_hidden_layers=5),
    "gemma": lambda: tiny_gemma(num_hidden_layers=4),
    "gpt2": lambda: tiny_gpt2(n_layer=4),
    "opt": lambda: tiny_opt(num_hidden_layers=3),
}


def tiny_gemma3(layers: int = 7):
    """Gemma-3's text model: 5 sliding-window layers to 1 full-attention one (``layer_types``),
    each kind with its own rotary table and mask."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    torch.manual_seed(0)
    return Gemma3ForCausalLM(Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                              num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                              vocab_size=128, sliding_window=4)).eval()


def _one_gelu_layer():
    model = tiny_llama(num_hidden_layers=4)
    model.model.layers[1].mlp.act_fn = torch.nn.GELU()
    return model


# Models whose layers come in kinds: (builder, layers the shallow export holds, kinds).
PER_KIND = {
    "gemma3_sliding_full": (tiny_gemma3, 3, 2),  # S S S S S F S: layers 0, 5 and 6
    "qwen2_mixed": (lambda: tiny_qwen2(num_hidden_layers=6, use_sliding_window=True, sliding_window=4,
                                       max_window_layers=3), 4, 2),  # F F F S S S: 0, 2, 3, 5
    "llama_one_gelu_layer": (_one_gelu_layer, 3, 2),  # a module of another class: 0, 1, 3
}
BUILDERS = {**FAMILIES, **{name: make for name, (make, _, _) in PER_KIND.items()}}


@pytest.fixture(autouse=True)
def no_capture_cache(monkeypatch):
    monkeypatch.setenv("FXPEFT_CAPTURE_CACHE", "0")  # each capture here must really capture


def captured(model, monkeypatch, replicated: bool, caplog):
    monkeypatch.setenv("FXPEFT_REPLICATE", "1" if replicated else "0")
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="fxpeft"):
        program = capture(model)
    assert any("replicated from" in r.message for r in caplog.records) == replicated
    return program


@pytest.mark.parametrize("family", BUILDERS)
def test_a_replicated_capture_is_the_full_capture_node_for_node(family, monkeypatch, caplog):
    model = BUILDERS[family]()
    fast = captured(model, monkeypatch, True, caplog)
    full = captured(model, monkeypatch, False, caplog)
    assert graph_signature(fast.graph) == graph_signature(full.graph)
    assert fast.module_paths() == full.module_paths()
    assert fast.info == full.info
    assert [n.name for n in fast.graph.find_nodes(op="get_attr")] == \
        [n.name for n in full.graph.find_nodes(op="get_attr")]  # parameters named as export names them
    last = f"{replicate.find_layer_stack(model).path}.{fast.layer_count - 1}"
    for name, param in model.named_parameters():  # bound to the model's own tensors
        if name.startswith(last):
            assert fast.graph_module.get_parameter(name) is param
    fast.graph.lint()


def _outputs_and_grads(model, rules, monkeypatch, replicated: bool):
    monkeypatch.setenv("FXPEFT_REPLICATE", "1" if replicated else "0")
    gm = fxpeft.rewrite(model, rules)
    randomize_adapters(gm)
    ids = token_batch()
    out = gm(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad for n, p in gm.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


@pytest.mark.parametrize("family, rules", [("llama_gqa", "lora_qv"), ("llama_gqa", "ia3"),
                                           ("llama_gqa", "llama_adapter"), ("qwen2", "lora_all_linear"),
                                           ("qwen2_all_sliding", "lora_qv"),
                                           ("gpt2", "lora_all_linear"), ("gemma", "ia3"),
                                           ("gemma3_sliding_full", "lora_all_linear"),
                                           ("qwen2_mixed", "lora_qv")])
def test_adapted_replicated_graphs_compute_what_full_ones_do(family, rules, monkeypatch):
    model = BUILDERS[family]()
    logits, grads = _outputs_and_grads(model, rules, monkeypatch, replicated=True)
    full_logits, full_grads = _outputs_and_grads(model, rules, monkeypatch, replicated=False)
    torch.testing.assert_close(logits, full_logits, rtol=0, atol=1e-6)
    assert grads.keys() == full_grads.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads[name], full_grads[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", PER_KIND)
def test_layers_of_a_few_kinds_are_replicated_one_per_kind(family, monkeypatch, caplog):
    """The shallow export holds each kind's first and last layer; the graph then has every
    layer, each reading its own kind's shared nodes (Gemma-3: a rotary table and a mask per kind)."""
    make, held, kinds = PER_KIND[family]
    model = make()
    program = captured(model, monkeypatch, True, caplog)
    count = len(replicate.find_layer_stack(model).layers)
    assert f"replicated from {held} of its {count} layers ({kinds} kinds)" in caplog.text
    plan = replicate.plan_layers(model, replicate.find_layer_stack(model))
    assert len(plan.held) == held and len(set(plan.kinds)) == kinds
    assert program.layer_count == count
    ids = token_batch()
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "position_ids": torch.arange(ids.shape[1]).expand(ids.shape[0], -1)}
    logits = program.graph_module(*(inputs[name] for name in program.info.inputs))[0]
    torch.testing.assert_close(logits, model(ids).logits, rtol=0, atol=1e-5)


def test_gemma3_layers_read_their_kinds_rotary_table_and_mask(monkeypatch, caplog):
    """Per kind, not per layer: the sliding layers share one rotary table's cos and one mask, the
    full-attention layers another."""
    model = tiny_gemma3()
    graph = captured(model, monkeypatch, True, caplog).graph
    kinds = model.config.layer_types
    readers = {}  # layer -> the shared nodes its attention reads
    for node in graph.nodes:
        layer = next((p for p, _ in (node.meta.get("nn_module_stack") or {}).values()
                      if p.startswith("model.layers.") and p.count(".") == 2), None)
        if layer is not None:
            for arg in node.all_input_nodes:
                if not any(p.startswith("model.layers.") for p, _ in (arg.meta.get("nn_module_stack") or {}).values()) \
                        and arg.op != "get_attr":
                    readers.setdefault(int(layer.split(".")[2]), set()).add(arg)
    by_kind = {kind: {frozenset(readers[i] - {n for n in readers[i] if n.op == "placeholder"})
                      for i in range(1, len(kinds)) if kinds[i] == kind} for kind in set(kinds)}
    assert all(len(shared) == 1 for shared in by_kind.values()), by_kind
    assert by_kind["sliding_attention"] != by_kind["full_attention"]


def _sliding_qwen2():  # layer_types: 2 full-attention layers, then 2 sliding-window ones
    return tiny_qwen2(num_hidden_layers=4, use_sliding_window=True, sliding_window=4,
                      max_window_layers=2)


def _all_layers_differ():  # GPT-2 scales each layer's attention by 1 / (its index + 1)
    return tiny_gpt2(n_layer=4, scale_attn_by_inverse_layer_idx=True)


def _hooked_layer():
    model = tiny_llama(num_hidden_layers=4)
    model.model.layers[2].mlp.register_forward_hook(lambda module, args, out: out * 2)
    return model


@pytest.mark.parametrize("make, reason", [
    (_sliding_qwen2, "2 kinds of layer among 4 layers (each kind's first and last are exported): nothing to save"),
    (_hooked_layer, "has hooks"),
    (_all_layers_differ, "4 kinds of layer among 4 layers"),
    (lambda: tiny_llama(num_hidden_layers=2), None),
])
def test_models_whose_layers_differ_are_exported_whole(make, reason, monkeypatch, caplog):
    model = make()
    with caplog.at_level(logging.DEBUG, logger="fxpeft"):
        program = capture(model)
    messages = " ".join(r.message for r in caplog.records)
    assert "replicated from" not in messages
    if reason is not None:
        assert reason in messages
    ids = token_batch()
    gm = fxpeft.rewrite(model, "lora_all_linear")
    torch.testing.assert_close(gm(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    assert program.layer_count == len(replicate.find_layer_stack(model).layers)


def test_a_last_layer_that_computes_differently_fails_the_graph_check(monkeypatch, caplog):
    model = tiny_llama(num_hidden_layers=4)
    mlp = model.model.layers[3].mlp
    base = type(mlp)
    # Same class name and module (and so the same module path types), a different forward.
    mlp.__class__ = type(base.__name__, (base,), {"forward": lambda self, x: base.forward(self, x) * 2,
                                                  "__module__": base.__module__,
                                                  "__qualname__": base.__qualname__})
    stack = replicate.find_layer_stack(model)
    assert replicate.layer_kinds(model, stack) == (0, 0, 0, 1)  # the class object differs
    monkeypatch.setattr(replicate, "layer_kinds", lambda model, stack: (0, 0, 0, 0))
    with caplog.at_level(logging.DEBUG, logger="fxpeft"):
        gm = fxpeft.rewrite(model, "lora_qv")
    messages = " ".join(r.message for r in caplog.records)
    assert "exported whole, not replicated" in messages and "differ" in messages, messages
    ids = token_batch()
    torch.testing.assert_close(gm(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def _decode(gm, replicated: bool, monkeypatch, caplog):
    """Greedy tokens, the decode graph of ``gm`` built again with replication on or off, and the
    debug log of building it."""
    monkeypatch.setenv("FXPEFT_REPLICATE", "1" if replicated else "0")
    decode_graph.forget(gm)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="fxpeft"):
        tokens = fxpeft.generate(gm, token_batch()[:2, :5], max_new_tokens=5)
    messages = " ".join(r.message for r in caplog.records)
    assert ("decode graph: replicated from" in messages) == replicated, messages
    assert len(decode_graph.cached_keys(gm)) == 1
    return tokens, decode_graph.decoder_for(gm, 2, 10), messages  # the one generate built (5 + 5 tokens)


# Decode graphs: every family of identical layers, and the models whose layers come in kinds.
DECODE = {**FAMILIES, "gemma3_sliding_full": tiny_gemma3, "qwen2_mixed": PER_KIND["qwen2_mixed"][0]}


@pytest.mark.parametrize("family", DECODE)
def test_a_replicated_decode_graph_is_the_full_export_node_for_node(family, monkeypatch, caplog):
    model = DECODE[family]()
    gm = fxpeft.rewrite(model, "lora_all_linear")
    randomize_adapters(gm)
    tokens, decoder, messages = _decode(gm, True, monkeypatch, caplog)
    full_tokens, full_decoder, _ = _decode(gm, False, monkeypatch, caplog)
    plan = replicate.plan_layers(model, replicate.find_layer_stack(model))
    held = f"replicated from {len(plan.held)} of {len(plan.kinds)} layers ({len(set(plan.kinds))} kinds)"
    assert held in messages, messages  # per kind: 3 of Gemma-3's 7 layers, 4 of the Qwen2's 6
    assert graph_signature(decoder.graph) == graph_signature(full_decoder.graph)
    assert [n.name for n in decoder.graph.find_nodes(op="get_attr")] == \
        [n.name for n in full_decoder.graph.find_nodes(op="get_attr")]
    assert torch.equal(tokens, full_tokens)
    kv = [n.target for n in decoder.graph.find_nodes(op="get_attr") if n.target.startswith("fxpeft_kv")]
    assert len(kv) == 2 * gm.capture_info.config.num_hidden_layers + 1  # keys, values; one length
    decoder.graph.lint()


def test_a_gemma3_replicated_decode_graph_generates_peft_greedy_tokens(monkeypatch, caplog, tmp_path):
    """LoRA on Gemma-3 (sliding and full layers; 5 + 5 tokens pass the window of 4): the decode
    graph replicated per kind writes each layer's own cache, so its greedy tokens are PEFT's."""
    from peft import PeftModel
    gm = fxpeft.rewrite(tiny_gemma3(), "lora_qv")
    randomize_adapters(gm, seed=3)
    tokens, _, messages = _decode(gm, True, monkeypatch, caplog)
    assert "replicated from 3 of 7 layers (2 kinds)" in messages
    fxpeft.save(gm, tmp_path / "adapter")
    twin = PeftModel.from_pretrained(tiny_gemma3(), tmp_path / "adapter").eval()
    prompt = token_batch()[:2, :5]
    theirs = twin.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5,
                           do_sample=False)
    assert torch.equal(tokens, theirs)
    with gm.disable_adapters():  # the adapter changes the tokens: the comparison sees it
        assert not torch.equal(fxpeft.generate(gm, prompt, max_new_tokens=5), tokens)


def test_each_decode_graph_owns_its_kv_cache(monkeypatch):
    """Two adapted copies of one model share the capture cache's graph, not their KV caches."""
    monkeypatch.setenv("FXPEFT_CAPTURE_CACHE", "1")
    first, second = (fxpeft.rewrite(tiny_llama(num_hidden_layers=4), "lora_qv") for _ in range(2))
    randomize_adapters(first, seed=1), randomize_adapters(second, seed=2)
    prompt = token_batch()[:2, :5]
    alone = fxpeft.generate(first, prompt, max_new_tokens=4)
    for gm in (first, second):  # the second decode graph comes from the capture cache
        fxpeft.generate(gm, prompt, max_new_tokens=4)
    decoders = [decode_graph.decoder_for(gm, 2, 9) for gm in (first, second)]  # the ones built
    assert all(len(decode_graph.cached_keys(gm)) == 1 for gm in (first, second))
    for target in ("fxpeft_kv_keys_0", "fxpeft_kv_values_3", "fxpeft_kv_length"):
        assert fetch(decoders[0], target) is not fetch(decoders[1], target)
    assert torch.equal(fxpeft.generate(first, prompt, max_new_tokens=4), alone)  # its own cache


def test_a_decode_graph_whose_last_layer_reads_another_cache_is_exported_whole(monkeypatch, caplog):
    """The shallow model holds the caches of the first and last layers only: a last layer that
    writes another layer's cache (here made to, by its ``layer_idx``) is not replicated."""
    bound = decode_graph._bound_model

    def last_layer_reads_cache_1(gm):
        model = bound(gm)
        model.model.layers[-1].self_attn.layer_idx = 1
        return model
    monkeypatch.setattr(decode_graph, "_bound_model", last_layer_reads_cache_1)
    gm = fxpeft.rewrite(tiny_llama(num_hidden_layers=4), "lora_qv")
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="fxpeft"):
        tokens = fxpeft.generate(gm, token_batch()[:2, :5], max_new_tokens=3)
    messages = " ".join(r.message for r in caplog.records)
    assert "not replicated" in messages and "cache of a layer the shallow model does not hold" in messages
    assert tokens.shape == (2, 8)


@pytest.mark.parametrize("family", ["gemma3_sliding_full", "qwen2_mixed", "llama_gqa", "gpt2"])
def test_the_position_probe_answers_on_one_layer_per_kind_as_on_the_whole_model(family):
    """Cold ``rewrite`` probes positions on each kind's first layer only (``probe_model``): the
    same answers as the whole model, with and without ``position_ids`` among the inputs."""
    from fxpeft.capture import positions
    from fxpeft.capture.export import probe_model
    from fxpeft.capture.hf import example_inputs
    model = BUILDERS[family]()
    stack = replicate.find_layer_stack(model)
    kinds = replicate.plan_layers(model, stack).kinds
    shallow = probe_model(model)
    layers = replicate.find_layer_stack(model).path.split(".")
    held = fetch(shallow, ".".join(layers))
    assert len(held) == len(set(kinds)) and list(held) == [stack.layers[kinds.index(k)] for k in sorted(set(kinds))]
    inputs = example_inputs(model)
    assert positions.probe(shallow, dict(inputs)) == positions.probe(model, dict(inputs))
    unpadded = {"input_ids": inputs["input_ids"]}
    assert positions.probe(shallow, dict(unpadded)) == positions.probe(model, dict(unpadded))
    if "position_ids" in inputs:  # decoders count positions and keep packs apart
        assert positions.probe(shallow, dict(inputs)) == ("counting", True)
