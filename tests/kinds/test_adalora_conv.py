"""AdaLoRA on a Conv2d (PEFT's ``SVDConv2d``): identity at init and the graph it splices, outputs
and gradients equal to PEFT's, rank allocation equal to PEFT's at every step, folders both ways
after allocation, merge, fuse and compile; 1-d, 3-d and grouped convolutions refused by name."""

import json

import pytest
import torch
from peft import AdaLoraConfig, PeftModel, get_peft_model

import fxpeft
from conftest import adapter_nodes, assert_only_adapters_get_grads
from fxpeft.kinds.adalora import allocator
from fxpeft.names import ADAPTER_META
from kind_checks import allocation_steps
from peft_models import custom_model, matrix_input

COMPONENTS = ("lora_A", "lora_E", "lora_B")
KNOBS = dict(init_r=4, target_r=2, tinit=1, tfinal=1, total_step=6, lora_alpha=8)
aten = torch.ops.aten


def _config(targets=("conv2d", "lin0"), **knobs):
    return AdaLoraConfig(target_modules=list(targets), **{**KNOBS, **knobs})


def _adapter_params(model):
    return {n.removeprefix("base_model.model.").replace(".default", ""): p
            for n, p in model.named_parameters() if any(c in n for c in COMPONENTS)}


def _twin(**knobs):
    """PEFT's model and fxpeft's graph from the same config, holding the same random values."""
    peft_model = get_peft_model(custom_model("Conv2d"), _config(**knobs))
    generator = torch.Generator().manual_seed(3)
    gm = fxpeft.rewrite(custom_model("Conv2d"), _config(**knobs))
    ours = dict(gm.named_parameters())
    with torch.no_grad():
        for name, param in _adapter_params(peft_model).items():
            param.copy_(torch.randn(param.shape, generator=generator) * (0.5 if "lora_E" in name else 0.2))
            ours[name].copy_(param)
    return peft_model, gm


def test_identity_at_init_peft_shapes_graph_and_gradients():
    model, x = custom_model("Conv2d"), matrix_input("Conv2d")
    gm = fxpeft.rewrite(model, _config(["conv2d"]))
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    trainable = {n: tuple(p.shape) for n, p in gm.named_parameters() if p.requires_grad}
    assert trainable == {"conv2d.lora_A": (4, 5 * 3 * 3), "conv2d.lora_E": (4, 1),
                         "conv2d.lora_B": (10, 4)}
    peft_shapes = {n: tuple(p.shape) for n, p in _adapter_params(
        get_peft_model(custom_model("Conv2d"), _config(["conv2d"]))).items()}
    assert trainable == peft_shapes
    gm.graph.lint()
    added = adapter_nodes(gm, "adalora")
    convs = [n for n in added if n.target == aten.conv2d.default]
    assert len(convs) == 1 and convs[0].args[1].target == aten.reshape.default
    assert [n.target for n in added if n.meta[ADAPTER_META].removable] == [aten.add.Tensor]
    with torch.no_grad():  # E starts at zero, which leaves A and B without gradients
        gm.get_parameter("conv2d.lora_E").fill_(0.5)
    gm(x).sum().backward()
    assert_only_adapters_get_grads(gm)


def test_outputs_and_gradients_equal_peft():
    x = matrix_input("Conv2d")
    peft_model, gm = _twin()
    expected = peft_model(x)
    assert (expected - custom_model("Conv2d")(x)).abs().max() > 1e-3
    torch.testing.assert_close(gm(x), expected, rtol=0, atol=1e-5)
    peft_model(x).sum().backward()
    gm(x).sum().backward()
    ours = dict(gm.named_parameters())
    for name, param in _adapter_params(peft_model).items():
        torch.testing.assert_close(ours[name].grad, param.grad, rtol=1e-5, atol=1e-6)


def test_rank_allocation_and_folders_equal_peft(tmp_path):
    x = matrix_input("Conv2d")
    peft_model, gm = _twin()  # from a PEFT config: allocates when told, as PEFT
    allocation_steps(peft_model, gm, range(4), lambda model: model(x).pow(2).mean(), 0.1)
    pattern = {k.removeprefix("base_model.model.").removesuffix(".default").removesuffix(".lora_E"): v
               for k, v in peft_model.peft_config["default"].rank_pattern.items()}
    assert {k: v.tolist() for k, v in allocator(gm, "default").rank_pattern.items()} == pattern
    assert sum(sum(v) for v in pattern.values()) < 2 * 4  # the budget shrank
    peft_model.eval(), gm.eval()
    expected = peft_model(x)
    torch.testing.assert_close(gm(x), expected, rtol=0, atol=1e-5)
    peft_model.save_pretrained(tmp_path / "peft")
    fxpeft.save(gm, tmp_path / "ours")
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    mine = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert mine["rank_pattern"] == theirs["rank_pattern"]
    loaded = fxpeft.load(custom_model("Conv2d"), tmp_path / "peft").eval()
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=1e-5)
    back = PeftModel.from_pretrained(custom_model("Conv2d"), tmp_path / "ours").eval()
    torch.testing.assert_close(back(x), expected, rtol=0, atol=1e-5)
    merged = fxpeft.merge(loaded)
    assert not adapter_nodes(merged, "adalora")
    torch.testing.assert_close(merged(x), expected, rtol=0, atol=1e-5)


def test_fuse_and_compile_keep_the_outputs():
    x = matrix_input("Conv2d")
    _, gm = _twin()
    gm.eval()
    expected = gm(x)
    torch.testing.assert_close(fxpeft.fuse(gm)(x), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.compile(gm, fullgraph=True)(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_id, what", [("Conv1d", "a 1-d convolution"),
                                            ("Conv2dGroups2", "a convolution with groups = 2")])
def test_other_convolutions_are_refused_by_name(model_id, what):
    with pytest.raises(fxpeft.FxpeftError, match=f"conv[12]d: AdaLoRA on {what} is not supported"):
        fxpeft.rewrite(custom_model(model_id), AdaLoraConfig(
            target_modules=["conv1d" if model_id == "Conv1d" else "conv2d"], total_step=2))
