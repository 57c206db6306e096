"""The in-process capture cache: a hit gives the graph and outputs a fresh capture gives, bound to
the new model's own parameters; anything that changes the graph misses."""

import logging

import pytest
import torch

import fxpeft
from conftest import device_constants, graph_signature, randomize_adapters, tiny_llama, token_batch
from fxpeft.capture import cache as capture_cache
from fxpeft.capture.export import capture


def signature(program):
    return [(n.op, str(n.target), len(n.args)) for n in program.graph.nodes]


def from_the_cache(model, caplog) -> bool:
    """Capture ``model``; whether the capture came from the cache (its debug log says so)."""
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="fxpeft"):
        capture(model)
    return any("from the capture cache" in r.getMessage() for r in caplog.records)


@pytest.fixture(autouse=True)
def empty_cache(monkeypatch):
    monkeypatch.setenv("FXPEFT_CAPTURE_CACHE", "memory")  # the disk cache: test_capture_disk_cache.py
    capture_cache.clear()
    yield
    capture_cache.clear()


def test_a_hit_equals_a_fresh_capture_and_uses_the_new_models_parameters(monkeypatch):
    first = capture(tiny_llama())
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(2)  # a different model, same shape
    hit = capture(model)
    monkeypatch.setenv("FXPEFT_CAPTURE_CACHE", "0")
    fresh = capture(model)
    assert signature(hit) == signature(fresh) == signature(first)
    assert hit.graph_module.get_parameter("model.layers.0.self_attn.q_proj.weight") is \
        model.model.layers[0].self_attn.q_proj.weight
    gm_hit = fxpeft.rewrite(model, "lora_qv")
    monkeypatch.setenv("FXPEFT_CAPTURE_CACHE", "0")
    gm_fresh = fxpeft.rewrite(model, "lora_qv")
    randomize_adapters(gm_hit), randomize_adapters(gm_fresh)
    ids = token_batch()
    torch.testing.assert_close(gm_hit(ids, labels=ids).loss, gm_fresh(ids, labels=ids).loss, rtol=0, atol=0)
    assert signature(capture(model)) == signature(hit)


def test_a_changed_config_structure_or_version_misses(monkeypatch):
    model = tiny_llama()
    key = capture_cache.cache_key(model, {"input_ids": token_batch()})
    assert key == capture_cache.cache_key(tiny_llama(), {"input_ids": token_batch()})
    assert key != capture_cache.cache_key(tiny_llama(rms_norm_eps=1e-5), {"input_ids": token_batch()})
    assert key != capture_cache.cache_key(tiny_llama(num_hidden_layers=3), {"input_ids": token_batch()})
    assert key != capture_cache.cache_key(model, {"input_ids": token_batch(), "attention_mask": token_batch()})
    renamed = tiny_llama()
    renamed.model.layers[0].mlp.act_fn = torch.nn.GELU()
    assert key != capture_cache.cache_key(renamed, {"input_ids": token_batch()})
    monkeypatch.setattr(capture_cache, "_versions", lambda: ("0.0", "0.0"))
    assert key != capture_cache.cache_key(model, {"input_ids": token_batch()})


def test_the_cache_keeps_the_latest_few_graphs(caplog):
    depths = range(1, capture_cache.MAX_ENTRIES + 3)  # two more models than the cache holds
    assert not any(from_the_cache(tiny_llama(num_hidden_layers=n), caplog) for n in depths)
    latest = depths[-capture_cache.MAX_ENTRIES:]
    assert all(from_the_cache(tiny_llama(num_hidden_layers=n), caplog) for n in reversed(latest))
    assert not from_the_cache(tiny_llama(num_hidden_layers=depths[0]), caplog)  # the oldest went


def test_a_replicated_capture_is_cached_like_a_full_one(caplog):
    first = capture(tiny_llama(num_hidden_layers=4))  # replicated from 2 layers (fxpeft.capture.replicate)
    model = tiny_llama(num_hidden_layers=4)
    assert from_the_cache(model, caplog)
    hit = capture(model)
    assert graph_signature(hit.graph) == graph_signature(first.graph)
    assert hit.graph_module.get_parameter("model.layers.3.mlp.up_proj.weight") is \
        model.model.layers[3].mlp.up_proj.weight


def test_moving_one_graph_leaves_the_cached_capture_and_later_graphs_on_their_device():
    """A forward with a ``no_grad`` region exports as a higher-order op whose body is a
    submodule; ``gm.to(device)`` rewrites that body's device constants, so every graph (and the
    cache) must own its copy."""

    def with_no_grad_region():
        model = tiny_llama()
        rotary = model.model.rotary_emb
        rotary.forward = torch.no_grad()(rotary.forward)
        return model
    capture_cache.clear()  # the cache cannot tell a patched forward from the plain one
    first = fxpeft.rewrite(with_no_grad_region(), "lora_qv.toml")
    assert [m for m in first.modules() if m is not first and isinstance(m, torch.fx.GraphModule)]
    first.to("meta")
    second = fxpeft.rewrite(with_no_grad_region(), "dora_qv.toml")
    assert {d.type for d in device_constants(second)} == {"cpu"}
    second(token_batch())
