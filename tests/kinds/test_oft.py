"""OFT (PEFT's OFTConfig): identity at init, the graph, PEFT parity both ways (Llama, OPT, conv,
PEFT's own custom-model cases), merge, gradients, named adapters, mixed batches, bf16 bases,
fuse, torch.compile(fullgraph=True), KV-cached generate, and the errors."""

import copy
import warnings

import pytest
import torch
from peft import OFTConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import fxpeft
import kind_checks
from conftest import (REPO_ROOT, adapter_nodes, assert_only_adapters_get_grads, emitted_base,
                      nodes_with_target, tiny_gpt2, tiny_llama, tiny_opt, token_batch)
from kind_checks import ATOL, MLP, check_both_ways, logits, mlp_input
from fxpeft.graph.gates import GATE_META
from fxpeft.kinds.oft import OftParams, blend, oft_rotation, rotate_blocks
from fxpeft.names import ADAPTER_META
from fxpeft.rules import Rule, Where

aten = torch.ops.aten
RULES = str(REPO_ROOT / "passes" / "oft.toml")
QV = dict(target_modules=["q_proj", "v_proj"], r=0, oft_block_size=8)
FAMILIES = {"llama": tiny_llama, "opt": tiny_opt}


def perturb(model, seed=3, scale=0.1):
    """Every OFT parameter off zero (a rotation away from the identity)."""
    kind_checks.perturb(model, "oft_", seed, scale)


def oft_graph(make=tiny_llama, seed=3, **overrides):
    gm = fxpeft.rewrite(make(), RULES, block_size=8, **overrides)
    perturb(gm, seed)
    return gm.eval()


def peft_oft(make=tiny_llama, seed=5, **config):
    model = get_peft_model(make(), OFTConfig(**{**QV, **config}))
    perturb(model, seed)
    return model.eval()


# --- identity, the graph, gradients -----------------------------------------------------------

def test_identity_at_init_with_peft_names_shapes_and_the_graph():
    model, ids = tiny_llama(), token_batch()
    gm = fxpeft.rewrite(model, RULES, block_size=8)
    torch.testing.assert_close(logits(gm, ids), logits(model, ids), rtol=0, atol=0)
    trainable = {n: tuple(p.shape) for n, p in gm.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.self_attn.{s}_proj.oft_R.weight": (8, 28)
                         for i in (0, 1) for s in "qv"}  # 64 = 8 blocks of 8; 8*7/2 triangle
    assert all(not p.any() for p in gm.parameters() if p.requires_grad)
    gm.graph.lint()
    added = adapter_nodes(gm, "oft")
    gates = [n for n in gm.graph.nodes if GATE_META in n.meta]
    assert [n.target for n in added[:4]] == [added[0].target, oft_rotation, rotate_blocks, blend]
    assert len(added) == 4 * 4 and len(gates) == 2 * 4  # per site: the buffer, per sample
    per_sample = 2  # once per graph: the adapter_names input and the Gates call
    base = emitted_base(tiny_llama())
    assert len(gm.graph.nodes) == len(base.graph.nodes) + len(added) + len(gates) + per_sample
    removable = [n for n in added if n.meta[ADAPTER_META].removable]
    assert [n.target for n in removable] == [blend] * 4
    for linear in nodes_with_target(gm, aten.linear.default):  # the input is rotated, not the output
        rotated = linear.args[0].target is blend
        assert rotated == any(p in str(linear.args[1]) for p in ("q_proj", "v_proj"))
        assert all(ADAPTER_META not in u.meta for u in linear.users)


def test_a_rotation_is_orthogonal_and_rotates_the_input_as_predicted():
    """One linear ``y = W x``: with the adapter, ``y = W R^T x`` with ``R`` orthogonal (the
    input's norm is kept), both with the exact Cayley map and with the Neumann series."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 3))
    x = torch.randn(5, 8)
    for neumann in (False, True):
        gm = fxpeft.rewrite(copy.deepcopy(net), Rule(where=Where(path=["^0$"]), params=OftParams(
            block_size=4, use_cayley_neumann=neumann)))
        perturb(gm, scale=0.05)
        rotation = torch.block_diag(*oft_rotation(gm.get_parameter("0.oft_R.weight").detach(), 4,
                                                  5 if neumann else 0, None))
        if not neumann:
            torch.testing.assert_close(rotation @ rotation.T, torch.eye(8), rtol=0, atol=1e-6)
        expected = torch.nn.functional.linear(x @ rotation, net[0].weight, net[0].bias)
        torch.testing.assert_close(gm(x), expected, rtol=0, atol=1e-6)


def test_gradients_reach_only_oft_parameters():
    gm = oft_graph().train()
    ids = token_batch()
    gm(ids, labels=ids).loss.backward()
    assert_only_adapters_get_grads(gm)
    assert all(n.endswith("oft_R.weight") for n, p in gm.named_parameters() if p.requires_grad)


# --- PEFT parity both ways ------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_peft_to_fxpeft(tmp_path, family):
    make, ids = FAMILIES[family], token_batch()
    peft_model = peft_oft(make)
    peft_model.save_pretrained(tmp_path)
    gm = fxpeft.load(make(), tmp_path)
    expected = logits(peft_model, ids)
    torch.testing.assert_close(logits(gm, ids), expected, rtol=0, atol=ATOL)
    assert (expected - logits(make(), ids)).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_fxpeft_to_peft(tmp_path, family):
    make, ids = FAMILIES[family], token_batch()
    gm = oft_graph(make, seed=9)
    folder = fxpeft.save(gm, tmp_path / "oft")
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    assert sorted(tensors) == sorted(f"base_model.model.{n}" for n in fxpeft.adapter_state_dict(gm))
    assert all(k.endswith(".oft_R.weight") for k in tensors)
    peft_model = PeftModel.from_pretrained(make(), str(folder)).eval()
    assert peft_model.peft_config["default"].oft_block_size == 8
    torch.testing.assert_close(logits(peft_model, ids), logits(gm, ids), rtol=0, atol=ATOL)


@pytest.mark.parametrize("options", [dict(use_cayley_neumann=False), dict(coft=True, eps=1e-2),
                                     dict(block_share=True, num_cayley_neumann_terms=3),
                                     dict(r=4, oft_block_size=0)],
                         ids=["exact", "coft", "block_share", "r"])
def test_peft_options_load_with_parity(tmp_path, options):
    ids = token_batch()
    peft_model = peft_oft(**options)
    expected = logits(peft_model, ids)  # COFT projects PEFT's parameters here, in place
    peft_model.save_pretrained(tmp_path)
    gm = fxpeft.load(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(gm, ids), expected, rtol=0, atol=ATOL)


def test_an_adapter_for_a_bf16_base_loads_with_parity_both_ways(tmp_path):
    kind_checks.check_bf16_both_ways(peft_oft(kind_checks.bf16_llama), "oft_", tmp_path)


# --- merge, fuse, compile ----------------------------------------------------------------------

def test_merge_equals_unmerged_and_peft_merge_and_unload():
    kind_checks.check_merge(oft_graph(), OFTConfig(**QV), "oft_")


def test_compiles_with_fullgraph_forward_and_backward():
    """On PEFT's MLP (the smallest model here), with COFT's in-place projection and the exact
    Cayley map's solve on one site and the Neumann series on the other."""
    torch.manual_seed(0)
    gm = fxpeft.rewrite(MLP(), [
        Rule(where=Where(path=["^lin0$"]), params=OftParams(r=2, block_size=0, coft=True, eps=0.05)),
        Rule(where=Where(path=["^lin1$"]), params=OftParams(block_size=4, use_cayley_neumann=False))])
    perturb(gm)
    kind_checks.check_compiles(gm.eval(), mlp_input())  # eval: PEFT's MLP has a dropout


# --- named adapters, mixed batches, generate -----------------------------------------------------

def test_named_adapters_switch_mix_fuse_save_alone_and_delete(tmp_path):
    gm = oft_graph()
    gm.add_adapter("other", RULES, block_size=16)
    perturb(gm, seed=11)
    kind_checks.check_named_adapters(gm, tmp_path)
    assert not any(n.meta[ADAPTER_META].adapter == "other" for n in adapter_nodes(gm, "oft"))


def test_fuse_keeps_two_active_adapters_stacked():
    gm, ids = oft_graph(), token_batch()
    gm.add_adapter("other", RULES, block_size=16)
    perturb(gm, seed=7)
    gm.set_adapter(["default", "other"])
    torch.testing.assert_close(logits(fxpeft.fuse(gm), ids), logits(gm, ids), rtol=0, atol=ATOL)


def test_greedy_generate_with_the_kv_cache_equals_peft(tmp_path):
    kind_checks.check_generate(oft_graph(seed=4), tmp_path)


# --- GPT-2 Conv1D: fxpeft only (PEFT's OFT refuses Conv1D) -------------------------------------------

def test_gpt2_conv1d_rotates_merges_and_peft_refuses_it():
    ids = token_batch()
    rule = Rule(where=Where(path=[r"attn\.c_attn$"]), params=OftParams(block_size=16))
    gm = fxpeft.rewrite(tiny_gpt2(), rule)
    torch.testing.assert_close(logits(gm, ids), logits(tiny_gpt2(), ids), rtol=0, atol=0)
    perturb(gm)
    addmm = [n for n in nodes_with_target(gm, aten.addmm.default) if n.args[1].target is blend]
    assert len(addmm) == 2
    merged = fxpeft.merge(gm)
    torch.testing.assert_close(logits(merged, ids), logits(gm, ids), rtol=0, atol=ATOL)
    with pytest.raises(TypeError, match="Conv1D"):
        get_peft_model(tiny_gpt2(), OFTConfig(target_modules=["c_attn"], oft_block_size=16))


# --- convolutions ---------------------------------------------------------------------------------

class Convs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 6, 3, padding=1)  # overlapping 3x3 patches on a 5x5 input
        self.point = torch.nn.Conv2d(6, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.point(torch.relu(self.conv(x)))


def images(seed=1):
    return torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(seed))


def test_conv2d_parity_both_ways_merge_of_1x1_and_refusal_of_3x3(tmp_path):
    torch.manual_seed(0)
    net, x = Convs().eval(), images()
    peft_model = get_peft_model(copy.deepcopy(net), OFTConfig(target_modules=["conv", "point"], r=2,
                                                             oft_block_size=0))
    perturb(peft_model)
    peft_model.eval().save_pretrained(tmp_path / "peft")
    gm = fxpeft.load(copy.deepcopy(net), tmp_path / "peft")
    with torch.no_grad():
        expected = peft_model(x)
        torch.testing.assert_close(gm(x), expected, rtol=0, atol=ATOL)
        assert tuple(gm.get_parameter("conv.oft_R.weight").shape) == (2, 18 * 17 // 2)
        again = PeftModel.from_pretrained(copy.deepcopy(net), str(fxpeft.save(gm, tmp_path / "ours")))
        torch.testing.assert_close(again.eval()(x), expected, rtol=0, atol=ATOL)
    with pytest.raises(fxpeft.FxpeftError, match="3x3 kernel .* overlapping input patches"):
        fxpeft.merge(gm)
    only_point = fxpeft.rewrite(copy.deepcopy(net), Rule(match="conv", where=Where(path=["^point$"]),
                                                         params=OftParams(r=2, block_size=0)))
    perturb(only_point)
    with torch.no_grad():
        torch.testing.assert_close(fxpeft.merge(only_point)(x), only_point(x), rtol=0, atol=ATOL)


# --- PEFT's custom-model cases (tests/test_custom_models.py, OFT) ------------------------------------

class EmbConv1D(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D
        self.emb, self.conv1d, self.lin0 = torch.nn.Embedding(100, 5), Conv1D(1, 5), torch.nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.lin0(torch.relu(self.conv1d(self.emb(x))).flatten(1)), dim=-1)


class Conv2D(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv2d, self.lin0 = torch.nn.Conv2d(5, 10, 3), torch.nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.lin0(torch.relu(self.conv2d(x.float().reshape(-1, 5, 3, 3))).flatten(1)), dim=-1)


MODELS = {"MLP": (MLP, mlp_input),
          "EmbConv1D": (EmbConv1D, lambda: torch.arange(60).view(6, 10) % 100),
          "Conv2d": (Conv2D, lambda: torch.randn(6, 45, generator=torch.Generator().manual_seed(2)))}
LIN0 = dict(r=2, oft_block_size=0, target_modules=["lin0"])
CASES = {  # PEFT's case names and configs, as tests/test_custom_models.py has them
    "Vanilla MLP 1 OFT": ("MLP", dict(LIN0, target_modules="lin0", use_cayley_neumann=False)),
    "Vanilla MLP 2 OFT": ("MLP", dict(LIN0, use_cayley_neumann=False)),
    "Vanilla MLP 5 OFT": ("MLP", dict(LIN0, modules_to_save=["lin1"], use_cayley_neumann=False)),
    "Vanilla MLP 6 OFT": ("MLP", dict(LIN0, module_dropout=0.1, use_cayley_neumann=False)),
    "Vanilla MLP 7 OFT": ("MLP", dict(LIN0, coft=True, eps=1e-2)),
    "Vanilla MLP 8 OFT": ("MLP", dict(LIN0, block_share=True, use_cayley_neumann=False)),
    "Vanilla MLP 9 OFT": ("MLP", dict(LIN0, coft=True, eps=1e-2, block_share=True)),
    "Vanilla MLP 10 OFT": ("MLP", dict(LIN0, r=0, oft_block_size=2, use_cayley_neumann=True)),
    "Vanilla MLP 11 OFT": ("MLP", dict(LIN0, r=0, oft_block_size=2, use_cayley_neumann=False)),
    "Vanilla MLP 12 OFT": ("MLP", dict(LIN0, r=0, oft_block_size=2, coft=True, eps=1e-2, block_share=True)),
    "Vanilla MLP 13 OFT": ("MLP", dict(LIN0, r=0, oft_block_size=2, coft=True, eps=1e-2, block_share=True,
                                       use_cayley_neumann=False)),
    "Embedding + transformers Conv1D 1 OFT": ("EmbConv1D", dict(r=1, oft_block_size=0, target_modules=["emb"])),
    "Embedding + transformers Conv1D 2 OFT": ("EmbConv1D", dict(r=1, oft_block_size=0, target_modules=["emb"],
                                                                block_share=True)),
    "Conv2d 1 OFT": ("Conv2d", dict(r=5, oft_block_size=0, target_modules=["conv2d"])),
    "Conv2d 3 OFT": ("Conv2d", dict(r=5, oft_block_size=0, target_modules=["conv2d"], coft=True)),
    "Conv2d 4 OFT": ("Conv2d", dict(r=5, oft_block_size=0, target_modules=["conv2d"], block_share=True)),
    "Conv2d 5 OFT": ("Conv2d", dict(r=5, oft_block_size=0, target_modules=["conv2d"], coft=True, block_share=True)),
}


@pytest.mark.parametrize("case", CASES)
def test_peft_custom_model_case(tmp_path, case):
    """PEFT's case, its OFT parameters perturbed: PEFT's folder loads into fxpeft with PEFT's
    outputs, and fxpeft's folder back into PEFT with the same."""
    model_name, config = CASES[case]
    make, inputs = MODELS[model_name]
    torch.manual_seed(0)
    base, x = make().eval(), inputs()
    peft_model = get_peft_model(copy.deepcopy(base), OFTConfig(**config)).eval()
    perturb(peft_model, scale=0.3)
    # PEFT's eps = 6e-5 barely rotates: its COFT cases move the outputs by less than 1e-4
    check_both_ways(base, peft_model, x, tmp_path, moves=not config.get("coft") or "eps" in config)


# --- errors ---------------------------------------------------------------------------------------

def test_params_errors_are_located(tmp_path):
    rules = tmp_path / "bad.toml"
    rules.write_text('[[rule]]\nmatch = "linear"\nrewrite = "oft"\n[rule.where]\npath = ["q_proj"]\n'
                     '[rule.params]\nr = 4\nblock_size = 8\n')
    with pytest.raises(fxpeft.RuleError, match=r"bad.toml:\d+: rule\[0\].params.block_size: You can "
                                                r"only specify either r \(4\) or block_size \(8\)"):
        fxpeft.rewrite(tiny_llama(), rules)
    with pytest.raises(fxpeft.RuleError, match=r"params.r: Either r or block_size must be non-zero"):
        OftParams(r=0, block_size=0)
    with pytest.raises(fxpeft.RuleError, match=r"params.num_cayley_neumann_terms: expected a positive"):
        OftParams(num_cayley_neumann_terms=0)


def test_an_indivisible_block_size_is_adjusted_as_peft_does():
    with pytest.warns(UserWarning, match=r"q_proj: Invalid `block_size` \(12\)! Adjusted `block_size` to \(8\)"):
        gm = fxpeft.rewrite(tiny_llama(), Rule(where=Where(path=[r"0\.self_attn\.q_proj$"]),
                                               params=OftParams(block_size=12)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(tiny_llama(), OFTConfig(target_modules=[r"q_proj"], oft_block_size=12))
    ours = gm.get_parameter("model.layers.0.self_attn.q_proj.oft_R.weight").shape
    assert ours == peft_model.base_model.model.model.layers[0].self_attn.q_proj.oft_R["default"].weight.shape


@pytest.mark.parametrize("field, value, message", [
    ("bias", "all", "bias = 'all' is not supported"),
    ("oft_block_size", None, "oft_block_size is missing"),
    ("r", 4, r"oft_block_size: You can only specify either r \(4\)"),
])
def test_unsupported_peft_config_values_are_one_line_errors(tmp_path, field, value, message):
    import json
    peft_oft().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    if value is None:
        del config[field]
    else:
        config[field] = value
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(fxpeft.FxpeftError, match=message) as caught:
        fxpeft.load(tiny_llama(), tmp_path)
    assert "\n" not in str(caught.value)


def test_conv_sites_peft_cannot_build_are_refused():
    class Dilated(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 2, 3, dilation=2)
            self.seq = torch.nn.Conv1d(2, 2, 1)

        def forward(self, x):
            return self.seq(self.conv(x).flatten(2))

    for path, message in (("^conv$", "dilation > 1 is not supported"), ("^seq$", "not conv1d")):
        with pytest.raises(fxpeft.FxpeftError, match=message):
            fxpeft.rewrite(Dilated(), Rule(match="conv", where=Where(path=[path]), params=OftParams(r=2, block_size=0)))
