"""LoRA on convolutions (``match = "conv"``): Conv2d (3x3, strided, 1x1) and Conv1d in a small
CNN captured with symbolic_trace and with torch.export; PEFT's layout and numbers both ways."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import fxpeft
from conftest import (REPO_ROOT, adapter_nodes, assert_only_adapters_get_grads, lora_branch_count,
                      randomize_adapters, train)
from fxpeft.capture.export import capture
from fxpeft.runtime.emit import emit
from fxpeft.rules import LoraParams, Rule, Where

aten = torch.ops.aten
RULES = REPO_ROOT / "passes" / "lora_conv.toml"
ATOL = 1e-5  # fp32; PEFT's and fxpeft's convolutions run the same kernels
CONVS = ["stem", "down", "point", "seq"]
SHAPES = {"stem": ((8, 3, 3, 3), (8, 8, 1, 1)), "down": ((8, 8, 3, 3), (16, 8, 1, 1)),
          "point": ((8, 16, 1, 1), (16, 8, 1, 1)), "seq": ((8, 16, 3), (8, 8, 1))}


class SmallCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.down = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.point = torch.nn.Conv2d(16, 16, 1)  # 1x1: PEFT merges it by a matrix product
        self.seq = torch.nn.Conv1d(16, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.down(torch.relu(self.stem(x))))
        x = self.point(x).flatten(2)  # [B, 16, H*W] for the 1-d convolution
        return self.head(torch.relu(self.seq(x)).mean(-1))


class ExportOnlyCNN(SmallCNN):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # control flow on a proxy: symbolic_trace fails, torch.export captures
            x = x.unsqueeze(0)
        return super().forward(x)


def images(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def build(frontend: str) -> tuple[torch.nn.Module, dict]:
    """A seeded CNN, and the capture arguments that make ``frontend`` capture it."""
    torch.manual_seed(0)
    if frontend == "export":
        return ExportOnlyCNN().eval(), {"example_inputs": (images(),)}
    return SmallCNN().eval(), {}


def rewrite(frontend: str, rules=RULES, **overrides):
    net, how = build(frontend)
    gm = fxpeft.rewrite(net, rules, **how, **overrides)
    assert gm.capture_info.frontend == frontend
    return net, gm


def peft_conv_lora(net: torch.nn.Module, **overrides) -> torch.nn.Module:
    config = LoraConfig(r=8, lora_alpha=16, target_modules=CONVS, init_lora_weights=False, **overrides)
    return get_peft_model(copy.deepcopy(net), config).eval()


def outputs(model, x):
    with torch.no_grad():
        return model(x)


FRONTENDS = ["symbolic_trace", "export"]


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_identity_at_init_shapes_and_graph(frontend):
    net, gm = rewrite(frontend)
    x = images()
    torch.testing.assert_close(gm(x), net(x), rtol=0, atol=0)
    shapes = {n: tuple(p.shape) for n, p in gm.named_parameters() if p.requires_grad}
    assert shapes == {f"{c}.lora_{ab}.weight": SHAPES[c][i] for c in CONVS for i, ab in enumerate("AB")}
    gm.graph.lint()
    added = adapter_nodes(gm)
    assert lora_branch_count(gm) == 4
    assert [n.target for n in added].count(aten.conv2d.default) == 6  # A and B at 3 Conv2d
    assert [n.target for n in added].count(aten.conv1d.default) == 2
    down = next(n for n in added if n.target == aten.conv2d.default and "down" in str(n.args[1].target))
    assert down.args[3:6] == ([2, 2], [1, 1], [1, 1])  # the base's stride and padding
    assert not any(n.target == aten.linear.default for n in added)


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_gradients_reach_only_the_adapter(frontend):
    _, gm = rewrite(frontend)
    randomize_adapters(gm)
    gm(images()).sum().backward()
    assert_only_adapters_get_grads(gm)


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_peft_to_fxpeft(tmp_path, frontend):
    net, how = build(frontend)
    peft_model = peft_conv_lora(net)
    peft_model.save_pretrained(tmp_path)
    gm = fxpeft.load(net, tmp_path, **how)
    x = images(seed=2)
    expected = outputs(peft_model, x)
    torch.testing.assert_close(outputs(gm, x), expected, rtol=0, atol=ATOL)
    assert (expected - outputs(net, x)).abs().max() > 1e-3


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_fxpeft_to_peft(tmp_path, frontend):
    net, gm = rewrite(frontend)
    randomize_adapters(gm, seed=3)
    folder = fxpeft.save(gm, tmp_path / "adapter")
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        f"base_model.model.{c}.lora_{ab}.weight": SHAPES[c][i] for c in CONVS for i, ab in enumerate("AB")}
    x = images(seed=2)
    expected = outputs(gm, x)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(net), str(folder)).eval()
    torch.testing.assert_close(outputs(peft_model, x), expected, rtol=0, atol=ATOL)
    (folder / "fxpeft_rules.toml").unlink()  # rebuilt from PEFT's config alone
    how = build(frontend)[1]
    torch.testing.assert_close(outputs(fxpeft.load(net, folder, **how), x), expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_merge_and_fuse_equal_unmerged_and_peft_merged(tmp_path, frontend):
    net, gm = rewrite(frontend)
    randomize_adapters(gm, seed=4)
    merged = fxpeft.merge(gm)
    merged.graph.lint()
    base = emit(capture(net, build(frontend)[1].get("example_inputs")))
    assert len(merged.graph.nodes) == len(base.graph.nodes) and not adapter_nodes(merged)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    x = images(seed=5)
    torch.testing.assert_close(outputs(merged, x), outputs(gm, x), rtol=0, atol=ATOL)
    torch.testing.assert_close(outputs(fxpeft.fuse(gm), x), outputs(gm, x), rtol=0, atol=ATOL)
    folder = fxpeft.save(gm, tmp_path / "a")
    peft_merged = PeftModel.from_pretrained(copy.deepcopy(net), str(folder)).merge_and_unload()
    for conv in CONVS:
        torch.testing.assert_close(merged.get_parameter(f"{conv}.weight"),
                                   peft_merged.get_parameter(f"{conv}.weight"), rtol=0, atol=1e-6)
    assert torch.equal(net.stem.weight, build(frontend)[0].stem.weight)  # the model is untouched


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_training_lowers_the_loss(frontend):
    net, gm = rewrite(frontend)
    frozen = {n: p.detach().clone() for n, p in net.named_parameters()}
    x, target = images(8), torch.randn(8, 4, generator=torch.Generator().manual_seed(7))
    losses = train(gm.train(), lambda g: torch.nn.functional.mse_loss(g(x), target))
    assert losses[-1] < 0.8 * losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in net.named_parameters())


class OneConv(torch.nn.Module):
    """A single ``nn.Conv2d(**options)`` named ``conv``."""

    def __init__(self, **options) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(**options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ExportOnlyConv(OneConv):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # symbolic_trace fails here; torch.export captures
            x = x.unsqueeze(0)
        return super().forward(x)


def test_grouped_convolution_matches_peft_but_does_not_merge(tmp_path):
    torch.manual_seed(0)
    net = OneConv(in_channels=4, out_channels=8, kernel_size=3, padding=1, groups=2).eval()
    x = torch.randn(2, 4, 6, 6)
    peft_model = get_peft_model(copy.deepcopy(net), LoraConfig(r=4, lora_alpha=8, target_modules=["conv"],
                                                                init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path)
    gm = fxpeft.load(net, tmp_path)
    assert gm.get_parameter("conv.lora_B.weight").shape == (8, 2, 1, 1)  # B keeps the groups
    torch.testing.assert_close(outputs(gm, x), outputs(peft_model, x), rtol=0, atol=ATOL)
    with pytest.raises(fxpeft.FxpeftError, match=r"at conv cannot be merged: its convolution has groups = 2"):
        fxpeft.merge(gm)
    with pytest.raises(fxpeft.FxpeftError, match=r"conv: LoRA rank 3 must be a multiple of the convolution's groups \(2\)"):
        fxpeft.rewrite(net, Rule(match="conv", params=LoraParams(r=3)))


def test_bundled_rules_take_every_convolution_and_explain_shows_them():
    net, _ = build("symbolic_trace")
    report = fxpeft.explain(net, RULES)
    assert report.rules[0].matched == CONVS
    assert "bound: conv2d 8->16 kernel 3x3 stride [2, 2] padding (1, 1) groups 1" in str(report)
    only_1d = Rule(match="conv", where=Where(module_type=["Conv1d"]), params=LoraParams())
    assert fxpeft.explain(net, only_1d).rules[0].matched == ["seq"]
    assert "head" not in fxpeft.explain(net, Rule(match="conv", params=LoraParams())).rules[0].reasons


def test_a_dilated_convolution_keeps_its_dilation_and_merges_exactly():
    """PEFT's A drops the dilation (its branch then has another size and PEFT fails); fxpeft's A
    keeps it, so the branch has the base's shape and the merge equals the unmerged graph."""
    torch.manual_seed(0)
    net = OneConv(in_channels=2, out_channels=4, kernel_size=3, padding=2, dilation=2).eval()
    x = torch.randn(2, 2, 7, 7)
    gm = fxpeft.rewrite(net, Rule(match="conv", params=LoraParams(r=4, init="random")))
    down = next(n for n in adapter_nodes(gm) if n.target == aten.conv2d.default)
    assert down.args[5] == [2, 2]
    assert (outputs(gm, x) - outputs(net, x)).abs().max() > 1e-3
    torch.testing.assert_close(outputs(fxpeft.merge(gm), x), outputs(gm, x), rtol=0, atol=ATOL)


def test_each_named_adapter_equals_a_graph_holding_it_alone(tmp_path):
    net, gm = rewrite("symbolic_trace")
    fxpeft.add_adapter(gm, "other", RULES, r=4)
    randomize_adapters(gm, seed=6)
    assert gm.get_parameter("stem.lora_A_other.weight").shape == (4, 3, 3, 3)
    x = images()
    for adapter in ("default", "other"):
        gm.set_adapter(adapter)
        alone = fxpeft.load(net, fxpeft.save(gm, tmp_path / adapter, adapter=adapter))
        torch.testing.assert_close(outputs(gm, x), outputs(alone, x), rtol=0, atol=ATOL)
    with gm.disable_adapters():
        torch.testing.assert_close(outputs(gm, x), outputs(net, x), rtol=0, atol=0)


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_string_padding_matches_peft(tmp_path, frontend):
    """``padding="same"``: PEFT's A keeps the string, and so does fxpeft (``aten.conv2d.padding``)."""
    torch.manual_seed(0)
    kind = ExportOnlyConv if frontend == "export" else OneConv
    net, x = kind(in_channels=3, out_channels=4, kernel_size=3, padding="same").eval(), images()
    peft_model = get_peft_model(copy.deepcopy(net), LoraConfig(r=4, lora_alpha=8, target_modules=["conv"],
                                                                init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path)
    gm = fxpeft.load(net, tmp_path, example_inputs=(x,))
    assert gm.capture_info.frontend == frontend
    down = next(n for n in adapter_nodes(gm) if n.target == aten.conv2d.padding)
    assert down.args[4] == "same"
    torch.testing.assert_close(outputs(gm, x), outputs(peft_model, x), rtol=0, atol=ATOL)
