"""Regional compilation as a pass (``fxpeft.fuse(gm, regions="layers")``): identical layers call
one shared region graph with their own weights as arguments; loss and gradients equal the flat
fused graph's within 1e-5, and ``torch.compile`` traces the region once however deep the model."""

import pytest
import torch

import fxpeft
from conftest import loss_and_grads, randomize_adapters, tiny_llama, tiny_t5, token_batch
from fxpeft.transforms.regions import REGIONS_MODULE, LayerRegion


def region_calls(gm):
    return [n for n in gm.graph.find_nodes(op="call_module") if n.target.startswith(REGIONS_MODULE)]


@pytest.mark.parametrize("model,rules", [(lambda: tiny_llama(num_hidden_layers=3), "lora_qv.toml"),
                                         (lambda: tiny_llama(num_hidden_layers=3), "dora_qv.toml"),
                                         (tiny_t5, "lora_all_linear.toml")])
def test_regional_loss_and_gradients_equal_the_flat_graph(model, rules):
    gm = fxpeft.rewrite(model(), rules).train()
    randomize_adapters(gm)
    ids = token_batch()
    batch = {"input_ids": ids, "labels": ids[:, :5].contiguous() if "T5" in type(gm).__name__ else ids}
    expected_loss, expected = loss_and_grads(fxpeft.fuse(gm), batch)
    loss, grads = loss_and_grads(fxpeft.fuse(gm, regions="layers"), batch)
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=1e-5)
    assert set(grads) == set(expected) == set(fxpeft.adapter_state_dict(gm))
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=1e-5)


def test_identical_layers_share_one_region_that_owns_no_parameters():
    gm = fxpeft.rewrite(tiny_llama(num_hidden_layers=4), "lora_qv.toml")
    regional = fxpeft.fuse(gm, regions="layers")
    regional.graph.lint()
    calls = region_calls(regional)
    assert len(calls) == 4 and {c.target for c in calls} == {f"{REGIONS_MODULE}.layer_0"}
    regions = [m for m in regional.modules() if isinstance(m, LayerRegion)]
    assert len(regions) == 1 and not list(regions[0].parameters())
    assert regional.state_dict().keys() == fxpeft.fuse(gm).state_dict().keys()
    assert regional.graph.find_nodes(op="call_function", target=torch.ops.aten.linear.default) == []


def test_layers_of_different_structure_get_their_own_region():
    gm = fxpeft.rewrite(tiny_llama(num_hidden_layers=3), fxpeft.rules.Rule(
        where=fxpeft.rules.Where(path=[r"layers\.[01]\.self_attn\.q_proj$"])))
    targets = [c.target for c in region_calls(fxpeft.fuse(gm, regions="layers"))]
    assert targets == [f"{REGIONS_MODULE}.layer_0"] * 2 + [f"{REGIONS_MODULE}.layer_1"]


class CountingBackend:
    """Counts dynamo frames; keeps each frame's graph (it runs as traced)."""

    def __init__(self) -> None:
        self.graphs = []

    def __call__(self, graph_module, example_inputs):
        self.graphs.append(graph_module)
        return graph_module.forward


def traced_regions(layers: int) -> tuple[int, list[str]]:
    """Dynamo frames of one compiled forward, and the subgraph each ``invoke_subgraph`` runs."""
    gm = fxpeft.rewrite(tiny_llama(num_hidden_layers=layers), "lora_qv.toml", dropout=0.0).eval()
    regional = fxpeft.fuse(gm, regions="layers")
    ids = token_batch()
    torch._dynamo.reset()
    backend = CountingBackend()
    with torch.no_grad():
        out = torch.compile(regional, backend=backend, fullgraph=True)(ids).logits
        torch.testing.assert_close(out, gm(ids).logits, rtol=0, atol=1e-5)
    invoke = torch.ops.higher_order.invoke_subgraph
    calls = [n for g in backend.graphs for n in g.graph.find_nodes(op="call_function", target=invoke)]
    return len(backend.graphs), [c.args[1] for c in calls]


def test_the_region_is_traced_once_whatever_the_depth():
    for layers in (2, 4):
        frames, subgraphs = traced_regions(layers)
        assert frames == 1
        assert len(subgraphs) == layers and len(set(subgraphs)) == 1  # one region, stamped out


def test_regions_and_checkpointing_are_one_choice():
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv.toml")
    with pytest.raises(ValueError, match="choose one"):
        fxpeft.fuse(gm, checkpoint="layers", regions="layers")
    with pytest.raises(ValueError, match="regions='blocks'"):
        fxpeft.fuse(gm, regions="blocks")
