"""``fxpeft.layer_units``: each decoder layer becomes a called module owning its parameters (base
and adapter), so FSDP2 can shard per layer; the outputs, gradients and parameter names stay the
flat graph's. The 2-process runs are in tests/integration/test_fsdp_layers.py."""

import pytest
import torch

import fxpeft
from conftest import loss_and_grads, randomize_adapters, tiny_llama, token_batch
from fxpeft.errors import FxpeftError, PassError
from fxpeft.transforms.units import LAYER_UNIT, layer_modules


@pytest.fixture(scope="module")
def graphs():
    gm = fxpeft.rewrite(tiny_llama(num_hidden_layers=3), "lora_qv.toml", dropout=0.0).train()
    randomize_adapters(gm)
    return gm, fxpeft.layer_units(gm)


def test_each_layer_is_one_call_of_a_module_owning_its_parameters(graphs):
    gm, units = graphs
    units.graph.lint()
    calls = [n.target for n in units.graph.find_nodes(op="call_module") if n.target.startswith("model.layers")]
    assert calls == ["model.layers.0", "model.layers.1", "model.layers.2"]
    layers = layer_modules(units)
    assert [m.meta[LAYER_UNIT] for m in layers] == calls
    for layer, module in zip(calls, layers):
        module.graph.lint()
        owned = {f"{layer}.{name}": p for name, p in module.named_parameters()}
        flat = {name: p for name, p in gm.named_parameters() if name.startswith(layer + ".")}
        assert owned.keys() == flat.keys() and all(owned[k] is flat[k] for k in flat)  # shared
        assert len(owned) == 13  # 9 base tensors, LoRA A and B on q and v
    # the outer graph reads only what no layer owns: embeddings, final norm, head, rotary tables
    reads = {n.target for n in units.graph.find_nodes(op="get_attr")}
    assert not any(t.startswith("model.layers.") for t in reads)
    assert {n for n, _ in units.named_parameters()} == {n for n, _ in gm.named_parameters()}
    assert not list(layer_modules(gm)) and len(list(gm.graph.find_nodes(op="call_module"))) < len(calls) + 5


def test_outputs_gradients_and_adapter_names_equal_the_flat_graph(graphs):
    gm, units = graphs
    ids = token_batch(2, 12)
    expected_loss, expected = loss_and_grads(gm, {"input_ids": ids, "labels": ids})
    loss, grads = loss_and_grads(units, {"input_ids": ids, "labels": ids})
    assert torch.equal(loss, expected_loss)  # the same ops in the same order
    assert set(grads) == set(expected) == set(fxpeft.adapter_state_dict(gm))  # only adapters
    assert all(torch.equal(grads[name], grad) for name, grad in expected.items())
    assert sorted(fxpeft.adapter_state_dict(units)) == sorted(fxpeft.adapter_state_dict(gm))


def test_a_graph_without_layers_is_refused_and_adapters_go_to_the_flat_graph(graphs):
    net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    plain = fxpeft.rewrite(net, fxpeft.rules.Rule(where=fxpeft.rules.Where(path=["0"])))
    with pytest.raises(PassError, match="no layers"):
        fxpeft.layer_units(plain)
    with pytest.raises(FxpeftError, match="add adapters to the graph it was fused from"):
        fxpeft.add_adapter(graphs[1], "other", "lora_qv.toml")


def test_adapter_dropout_draws_the_same_masks_as_the_flat_graph():
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv.toml").train()  # dropout 0.05: a shared module
    randomize_adapters(gm)
    units = fxpeft.layer_units(gm)
    ids = token_batch(2, 12)
    torch.manual_seed(1)
    expected = gm(input_ids=ids, labels=ids).loss
    torch.manual_seed(1)
    assert torch.equal(units(input_ids=ids, labels=ids).loss, expected)
