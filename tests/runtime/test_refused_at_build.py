"""Objects that cannot work are refused when they are built (issue 24, item 4): one-line
``FxpeftError``s, not errors from deep inside, and nothing changed after each."""

from __future__ import annotations

import pytest
import torch

import fxpeft
from conftest import tiny_llama


def tensors_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in module.state_dict().items()}


def assert_same(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    state = module.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in state)


@pytest.fixture(scope="module")
def graph():
    return fxpeft.rewrite(tiny_llama(), "lora_qv.toml")


def test_a_model_on_the_meta_device_is_refused_at_rewrite():
    with torch.device("meta"):
        model = tiny_llama()
    params = dict(model.named_parameters())
    for call in (fxpeft.rewrite, fxpeft.explain):
        with pytest.raises(fxpeft.FxpeftError, match=r"LlamaForCausalLM\.model\.embed_tokens\.weight "
                           r"is on the meta device \(a shape without values\); load the weights"):
            call(model, "lora_qv.toml")
    assert dict(model.named_parameters()) == params and all(p.is_meta for p in params.values())
    assert all(p.requires_grad for p in params.values())


@pytest.mark.parametrize("model, message", [
    ("llama", r"fxpeft.rewrite: the model must be a torch.nn.Module, got str 'llama'; load it first"),
    (None, r"fxpeft.rewrite: the model must be a torch.nn.Module, got NoneType None"),
])
def test_rewrite_of_something_that_is_no_model_is_refused(model, message):
    with pytest.raises(fxpeft.FxpeftError, match=message):
        fxpeft.rewrite(model, "lora_qv.toml")


@pytest.mark.parametrize("rules", [None, 8, [None]])
def test_rewrite_without_rules_is_refused(rules):
    model = tiny_llama()
    before = tensors_of(model)
    with pytest.raises(fxpeft.RuleError, match=r"rules= takes a path, a bundled rule-file name "
                       r"\(e.g. \"lora_qv.toml\"\), a RuleSet or Rule objects, got "):
        fxpeft.rewrite(model, rules)
    assert_same(model, before)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("names", [None, 3, ["default", None]])
def test_set_adapter_of_no_name_is_refused(graph, names):
    before, active = tensors_of(graph), graph.active_adapters
    with pytest.raises(fxpeft.FxpeftError, match=r"set_adapter takes an adapter name or a list of "
                       r"names, got .*; this graph has \['default'\]"):
        graph.set_adapter(names)
    assert graph.active_adapters == active
    assert_same(graph, before)


def test_the_base_adapter_name_is_reserved(graph):
    before, names = tensors_of(graph), graph.adapter_names
    with pytest.raises(fxpeft.FxpeftError, match=r"adapter name '__base__' is reserved: "
                       r"adapter_names=\[..., '__base__'\] means the base model"):
        fxpeft.add_adapter(graph, "__base__", "lora_qv.toml")
    with pytest.raises(fxpeft.FxpeftError, match="is reserved"):
        fxpeft.rewrite(tiny_llama(), "lora_qv.toml", adapter="__base__")
    assert graph.adapter_names == names
    assert_same(graph, before)
