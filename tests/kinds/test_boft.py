"""BOFT (PEFT's BOFTConfig) on linears: identity at init, the graph, PEFT parity both ways (Llama,
OPT, PEFT's custom-model cases; butterfly factors through PEFT's CUDA-extension path, run on the
CPU here), merge, gradients, named adapters, mixed batches, bf16, fuse, torch.compile, generate,
and the errors."""

import copy
import json

import pytest
import torch
from peft import BOFTConfig, PeftModel, get_peft_model
from peft.tuners.boft import layer as peft_boft

import fxpeft
import kind_checks
from conftest import (REPO_ROOT, adapter_nodes, assert_only_adapters_get_grads,
                      nodes_with_target, tiny_gpt2, tiny_llama, tiny_opt, token_batch)
from kind_checks import ATOL, MLP, check_both_ways, logits, mlp_input
from fxpeft.kinds.boft import BoftParams, rescale, rotate
from fxpeft.kinds.oft import blend
from fxpeft.names import ADAPTER_META
from fxpeft.rules import Rule, Where

aten = torch.ops.aten
RULES = str(REPO_ROOT / "passes" / "boft.toml")
QV = dict(target_modules=["q_proj", "v_proj"], boft_block_size=4)
FAMILIES = {"llama": tiny_llama, "opt": tiny_opt}


class _BlockDiagonal:
    """PEFT's ``fbd_cuda`` extension, computed on the CPU: ``[N, D, H, H]`` -> ``[N, DH, DH]``."""

    @staticmethod
    def forward(blocks):
        return [torch.stack([torch.block_diag(*factor) for factor in blocks])]


@pytest.fixture(autouse=True)
def butterfly_peft(monkeypatch):
    """PEFT's butterfly factors > 1 need its CUDA extension (without it PEFT uses one factor, and
    tries to build it again for every layer)."""
    monkeypatch.setattr(peft_boft, "_FBD_CUDA", _BlockDiagonal())


def perturb(model, seed=3, scale=0.1):
    kind_checks.perturb(model, "boft_", seed, scale)


def boft_graph(make=tiny_llama, seed=3, **overrides):
    gm = fxpeft.rewrite(make(), RULES, **overrides)
    perturb(gm, seed)
    return gm.eval()


def peft_boft_model(make=tiny_llama, seed=5, **config):
    model = get_peft_model(make(), BOFTConfig(**{**QV, **config}))
    perturb(model, seed)
    return model.eval()


def test_identity_at_init_with_peft_names_and_the_graph():
    model, ids = tiny_llama(), token_batch()
    gm = fxpeft.rewrite(model, RULES)
    torch.testing.assert_close(logits(gm, ids), logits(model, ids), rtol=0, atol=0)
    trainable = {n: tuple(p.shape) for n, p in gm.named_parameters() if p.requires_grad}
    expected = {f"model.layers.{i}.self_attn.{s}_proj.{c}": shape for i in (0, 1)
                for s, out in (("q", 64), ("v", 32))
                for c, shape in (("boft_R", (1, 16, 4, 4)), ("boft_s", (out, 1)))}
    assert trainable == expected  # q: 4 heads x 16 outputs, v: 2 kv heads x 16
    gm.graph.lint()
    removable = [n for n in adapter_nodes(gm, "boft") if n.meta[ADAPTER_META].removable]
    assert sorted(n.target.__name__ for n in removable) == ["blend"] * 4 + ["rescale"] * 4
    for linear in nodes_with_target(gm, aten.linear.default):
        adapted = any(p in str(linear.args[1]) for p in ("q_proj", "v_proj"))
        assert (linear.args[0].target is blend) == adapted
        assert (rescale in [u.target for u in linear.users]) == adapted  # and its per-sample gate
    assert {n.target for n in adapter_nodes(gm, "boft")} >= {rotate, blend, rescale}


def test_gradients_reach_only_boft_parameters():
    gm = boft_graph().train()
    ids = token_batch()
    gm(ids, labels=ids).loss.backward()
    assert_only_adapters_get_grads(gm)


@pytest.mark.parametrize("family", FAMILIES)
def test_parity_both_ways(tmp_path, family):
    make, ids = FAMILIES[family], token_batch()
    peft_model = peft_boft_model(make)
    peft_model.save_pretrained(tmp_path / "peft")
    gm = fxpeft.load(make(), tmp_path / "peft")
    expected = logits(peft_model, ids)
    torch.testing.assert_close(logits(gm, ids), expected, rtol=0, atol=ATOL)
    assert (expected - logits(make(), ids)).abs().max() > 1e-3
    ours = boft_graph(make, seed=9)
    again = PeftModel.from_pretrained(make(), str(fxpeft.save(ours, tmp_path / "ours"))).eval()
    torch.testing.assert_close(logits(again, ids), logits(ours, ids), rtol=0, atol=ATOL)


def test_butterfly_factors_match_peft_extension_path(tmp_path, butterfly_peft):
    ids = token_batch()
    peft_model = peft_boft_model(boft_block_size=4, boft_n_butterfly_factor=3)
    assert peft_model.base_model.model.model.layers[0].self_attn.q_proj.boft_R["default"].shape[0] == 3
    peft_model.save_pretrained(tmp_path)
    gm = fxpeft.load(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(gm, ids), logits(peft_model, ids), rtol=0, atol=ATOL)
    merged = fxpeft.merge(gm)
    theirs = peft_model.merge_and_unload()
    name = "model.layers.1.self_attn.v_proj.weight"
    torch.testing.assert_close(merged.get_parameter(name), theirs.get_parameter(name), rtol=0, atol=1e-6)


def test_merge_equals_unmerged_and_peft_merge_and_unload():
    kind_checks.check_merge(boft_graph(), BOFTConfig(**QV), "boft_")


def test_named_adapters_switch_mix_fuse_save_alone_and_delete(tmp_path):
    gm = boft_graph()
    gm.add_adapter("other", RULES, block_size=8)
    perturb(gm, seed=11)
    kind_checks.check_named_adapters(gm, tmp_path)


def test_bf16_base_parity_both_ways(tmp_path):
    kind_checks.check_bf16_both_ways(peft_boft_model(kind_checks.bf16_llama), "boft_", tmp_path)


def test_greedy_generate_with_the_kv_cache_equals_peft(tmp_path):
    kind_checks.check_generate(boft_graph(seed=4), tmp_path)


def test_compiles_with_fullgraph_forward_and_backward():
    torch.manual_seed(0)
    gm = fxpeft.rewrite(MLP(32), Rule(where=Where(path=["^lin1$"]),
                                      params=BoftParams(block_size=2, butterfly_factor=3)))
    perturb(gm)
    kind_checks.check_compiles(gm.eval(), mlp_input())


LIN1 = dict(target_modules=["lin1"])
CASES = {  # PEFT's tests/test_custom_models.py BOFT cases on linears
    "Vanilla MLP 1 BOFT": (20, dict(LIN1, boft_block_size=2)),
    "Vanilla MLP 2 BOFT": (20, dict(LIN1, modules_to_save=["lin0"], boft_block_size=2)),
    "Vanilla MLP 4 BOFT": (20, dict(LIN1, boft_block_size=2, boft_block_num=0, boft_n_butterfly_factor=1)),
    "Vanilla MLP 5 BOFT": (20, dict(LIN1, boft_block_size=0, boft_block_num=2, boft_n_butterfly_factor=1)),
    "Vanilla MLP 6 BOFT": (20, dict(LIN1, boft_block_size=10, boft_block_num=0, boft_n_butterfly_factor=2)),
    "MLP2 1 BOFT": (32, dict(LIN1, boft_block_size=2, boft_block_num=0, boft_n_butterfly_factor=3)),
    "MLP2 2 BOFT": (32, dict(LIN1, boft_block_size=0, boft_block_num=8, boft_n_butterfly_factor=3)),
}


@pytest.mark.parametrize("case", CASES)
def test_peft_custom_model_case(tmp_path, case, butterfly_peft):
    hidden, config = CASES[case]
    torch.manual_seed(0)
    base, x = MLP(hidden).eval(), mlp_input()
    peft_model = get_peft_model(copy.deepcopy(base), BOFTConfig(**config)).eval()
    perturb(peft_model, scale=0.3)
    check_both_ways(base, peft_model, x, tmp_path)


def test_errors_are_located_or_one_line(tmp_path):
    with pytest.raises(fxpeft.RuleError, match=r"params.block_num: You can only specify either block_size"):
        BoftParams(block_size=4, block_num=2)
    with pytest.raises(fxpeft.FxpeftError, match=r"q_proj: in_features \(64\) must be divisible by block_size \(6\)"):
        fxpeft.rewrite(tiny_llama(), RULES, block_size=6)
    with pytest.raises(fxpeft.FxpeftError, match=r"not GPT-2's Conv1D"):
        fxpeft.rewrite(tiny_gpt2(), Rule(where=Where(path=["c_attn"]), params=BoftParams()))
    peft_boft_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "boft_dropout": 0.1}))
    with pytest.raises(fxpeft.FxpeftError, match=r"boft_dropout = 0.1 is not supported") as caught:
        fxpeft.load(tiny_llama(), tmp_path)
    assert "\n" not in str(caught.value)


def test_peft_conv2d_cases_are_refused_naming_the_layer(tmp_path):
    """PEFT's "Conv2d 1 BOFT" case: BOFT on a convolution is not implemented here, and says so."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Conv2d(5, 10, 3))
    get_peft_model(copy.deepcopy(base), BOFTConfig(target_modules=["0"], boft_block_size=45)).save_pretrained(tmp_path)
    with pytest.raises(fxpeft.FxpeftError, match=r"needs BOFT \(boft\) on Conv2d at 0, which fxpeft does not support"):
        fxpeft.load(copy.deepcopy(base), tmp_path)
