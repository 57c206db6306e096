"""LoKr: PEFT's shapes (factorization), identity at init, the graph, PEFT parity both ways (Llama,
OPT; PEFT's LoKr has no GPT-2 Conv1D layer), PEFT's custom-model cases (MLP, Conv1d, Conv2d),
merge, rank/module dropout in train mode only, named adapters, mixed batches, gradients, bf16,
fuse, generate with the KV cache, and torch.compile(fullgraph=True) forward and backward."""

import copy
import json

import pytest
import torch
from peft import LoKrConfig, PeftModel, get_peft_model
from peft.tuners.lokr.layer import factorization as peft_factorization
from safetensors.torch import load_file

import fxpeft
from conftest import (REPO_ROOT, adapter_nodes, assert_only_adapters_get_grads, emitted_base,
                      randomize_adapters, tiny_gpt2, tiny_llama, tiny_opt, token_batch)
from fxpeft.kinds.lokr import LokrParams, factorization, kron_delta, lokr_shape
from fxpeft.kinds.lycoris import LYCORIS_DROPOUT
from fxpeft.formats.peft_format import PeftFormatError
from fxpeft.names import ADAPTER_META, GATE_META
from fxpeft.rules import Rule, Where
from peft_models import MODELS, custom_input, custom_model

aten = torch.ops.aten
ATOL = 1e-5
RULES = str(REPO_ROOT / "passes" / "lokr.toml")
QV = Where(path=[r"(^|\.)q_proj$", r"(^|\.)v_proj$"])
# Llama: the bundled file (whole w1 and w2); OPT (biases, learned positions): both factors
# low-rank, a rank and an alpha pattern, one layer excluded.
FAMILIES = {
    "llama": (tiny_llama, dict(target_modules=["q_proj", "v_proj"], r=8, alpha=16)),
    "opt": (tiny_opt, dict(target_modules=["q_proj", "v_proj"], r=2, alpha=4, decompose_both=True,
                           rank_pattern={"v_proj": 1}, alpha_pattern={"layers.1.self_attn.q_proj": 3},
                           exclude_modules=["model.decoder.layers.0.self_attn.q_proj"])),
}


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


def lokr_graph(**params):
    gm = fxpeft.rewrite(tiny_llama(), Rule(where=QV, params=LokrParams(**params)) if params else RULES)
    randomize_adapters(gm)
    return gm.eval()


def peft_lokr(make, config, seed=3):
    """PEFT's LoKr with every factor random (``init_weights=False``), in eval."""
    torch.manual_seed(seed)
    return get_peft_model(make(), LoKrConfig(init_weights=False, **config)).eval()


# --- shapes ------------------------------------------------------------------------------------

def test_factorization_equals_peft():
    for dimension in range(1, 300):
        for factor in (-1, 1, 2, 3, 4, 5, 8, 16, 17):
            assert factorization(dimension, factor) == peft_factorization(dimension, factor)


LAYERS = [torch.nn.Linear(64, 32), torch.nn.Linear(10, 20), torch.nn.Linear(20, 2), torch.nn.Linear(127, 96),
          torch.nn.Conv2d(5, 10, 3), torch.nn.Conv2d(16, 32, 3, groups=2), torch.nn.Conv2d(1, 10, 1),
          torch.nn.Conv1d(64, 16, 2), torch.nn.Conv1d(8, 8, 3, groups=2)]
OPTIONS = [dict(r=8), dict(r=1, decompose_both=True), dict(r=2, use_effective_conv2d=True),
           dict(r=4, decompose_factor=4, decompose_both=True, use_effective_conv2d=True), dict(r=16)]


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_parameter_shapes_equal_peft(options):
    """For every layer and option set, fxpeft's LoKr parameters have PEFT's names and shapes."""
    for layer in LAYERS:
        net = torch.nn.Sequential(layer)
        theirs = get_peft_model(copy.deepcopy(net), LoKrConfig(target_modules=["0"], **options))
        expected = {n.split(".")[-2]: tuple(p.shape) for n, p in theirs.named_parameters() if "lokr_" in n}
        kernel = tuple(getattr(layer, "kernel_size", ()))
        out = getattr(layer, "out_features", getattr(layer, "out_channels", 0))
        inputs = getattr(layer, "in_features", None) or layer.in_channels // layer.groups
        params = LokrParams(**options)
        assert lokr_shape(out, inputs, kernel, params).parameters(params.r) == expected, layer


# --- identity, the graph -------------------------------------------------------------------------

def test_identity_at_init_and_the_graph():
    model, ids = tiny_llama(), token_batch()
    gm = fxpeft.rewrite(model, RULES).eval()
    torch.testing.assert_close(logits(gm, ids), logits(model, ids), rtol=0, atol=0)
    gm.graph.lint()
    added = adapter_nodes(gm, "lokr")
    # per site: get_attr w1 and w2, kron_delta, linear, the gate's mul, the joining add; the gate
    # itself (its buffer and per-sample choice) and, once per graph, the per-sample gates
    gates = [n for n in gm.graph.nodes if GATE_META in n.meta]
    assert len(added) == 6 * 4 and len(gates) == 2 * 4
    assert len(gm.graph.nodes) == len(emitted_base(tiny_llama()).graph.nodes) + len(added) + len(gates) + 2
    joins = [n for n in added if n.meta[ADAPTER_META].removable]
    assert len(joins) == 4 and all(n.target == aten.add.Tensor for n in joins)
    assert [n.target for n in added].count(kron_delta) == 4
    assert [n.target for n in added].count(aten.linear.default) == 4
    assert {n.meta[ADAPTER_META].module_path for n in added} == {
        f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")}
    assert not hasattr(gm, LYCORIS_DROPOUT)  # no dropout asked for: no module
    trainable = {n: tuple(p.shape) for n, p in gm.named_parameters() if p.requires_grad}
    assert trainable["model.layers.0.self_attn.q_proj.lokr_w1"] == (8, 8)  # 64 = 8*8 both ways
    assert trainable["model.layers.0.self_attn.v_proj.lokr_w2"] == (8, 8)  # v: 32 = 4*8 out
    assert all(not p.any() for n, p in gm.named_parameters() if n.endswith("lokr_w1"))


@pytest.mark.parametrize("init", ["lycoris", "random"])
def test_other_inits(init):
    """``lycoris`` zeroes w2 (identity too), ``random`` nothing (PEFT's init_weights=False)."""
    model, ids = tiny_llama(), token_batch()
    gm = fxpeft.rewrite(model, Rule(where=QV, params=LokrParams(r=1, init=init, decompose_both=True))).eval()
    change = (logits(gm, ids) - logits(model, ids)).abs().max()
    assert (change == 0) if init == "lycoris" else (change > 1e-4)
    zero = [n for n, p in gm.named_parameters() if "lokr_" in n and not p.any()]
    assert all(n.endswith("lokr_w2_b") for n in zero) and bool(zero) == (init == "lycoris")


# --- PEFT parity ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILIES))
def test_peft_to_fxpeft_and_back(tmp_path, family):
    make, config = FAMILIES[family]
    peft_model = peft_lokr(make, config)
    peft_model.save_pretrained(tmp_path / "peft")
    ids = token_batch()
    expected = logits(peft_model, ids)
    assert (expected - logits(make(), ids)).abs().max() > 1e-3
    gm = fxpeft.load(make(), tmp_path / "peft")
    torch.testing.assert_close(logits(gm, ids), expected, rtol=0, atol=ATOL)
    folder = fxpeft.save(gm, tmp_path / "ours")
    assert load_file(str(folder / "adapter_model.safetensors")).keys() == \
        load_file(str(tmp_path / "peft" / "adapter_model.safetensors")).keys()
    back = PeftModel.from_pretrained(make(), str(folder)).eval()
    torch.testing.assert_close(logits(back, ids), expected, rtol=0, atol=ATOL)


def test_fxpeft_to_peft_on_llama_with_the_bundled_rules(tmp_path):
    gm = lokr_graph()
    folder = fxpeft.save(gm, tmp_path / "a")
    keys = load_file(str(folder / "adapter_model.safetensors"))
    assert set(keys) == {f"base_model.model.model.layers.{i}.self_attn.{p}.lokr_{w}"
                         for i in (0, 1) for p in ("q_proj", "v_proj") for w in ("w1", "w2")}
    peft_model = PeftModel.from_pretrained(tiny_llama(), str(folder)).eval()
    assert peft_model.peft_config["default"].alpha == 16
    ids = token_batch()
    torch.testing.assert_close(logits(peft_model, ids), logits(gm, ids), rtol=0, atol=ATOL)


def test_merge_equals_unmerged_and_peft_merge_and_unload(tmp_path):
    gm = lokr_graph(r=2, alpha=3, decompose_both=True)
    merged = fxpeft.merge(gm)
    merged.graph.lint()
    assert len(merged.graph.nodes) == len(emitted_base(tiny_llama()).graph.nodes)
    assert not any("lokr_" in n for n, _ in merged.named_parameters())
    ids = token_batch()
    torch.testing.assert_close(logits(merged, ids), logits(gm, ids), rtol=0, atol=ATOL)
    folder = fxpeft.save(gm, tmp_path / "a")
    peft_merged = PeftModel.from_pretrained(tiny_llama(), str(folder)).merge_and_unload()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"):
        torch.testing.assert_close(merged.get_parameter(name), peft_merged.get_parameter(name),
                                   rtol=0, atol=1e-6)


# --- PEFT's custom-model cases (tests/test_custom_models.py, LoKr), recreated --------------------

# PEFT's Conv2dGroups model names its first linear lin0 and its head lin1; ours are lead and lin0.
CASES = [  # (PEFT's case name, model, LoKrConfig fields)
    ("Vanilla MLP 1 LOKR", "MLP", {"target_modules": "lin0"}),
    ("Vanilla MLP 2 LOKR", "MLP", {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 LOKR", "MLP", {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 LOKR", "MLP", {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 LOKR", "MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 6 LOKR", "MLP", {"target_modules": ["lin0"], "alpha": 4, "module_dropout": 0.1}),
    ("Vanilla MLP 7 LOKR", "MLP", {"target_modules": "lin0", "rank_dropout": 0.5}),
    ("Vanilla MLP 8 LOKR", "MLP", {"target_modules": "lin0", "decompose_both": True, "r": 1, "alpha": 1}),
    ("Conv1d LOKR 1", "Conv1d", {"target_modules": ["conv1d"]}),
    ("Conv1d LOKR 2", "Conv1d", {"target_modules": ["conv1d"], "r": 2}),
    ("Conv1d Groups LOKR", "Conv1dGroups", {"target_modules": ["conv1d"], "r": 4}),
    ("Conv1d LOKR 3", "Conv1dBigger", {"target_modules": ["conv1d"], "r": 2, "use_effective_conv2d": True}),
    ("Conv1d LOKR 4", "Conv1dBigger", {"target_modules": ["conv1d"], "r": 2, "use_effective_conv2d": False}),
    ("Conv2d 1 LOKR", "Conv2d", {"target_modules": ["conv2d"]}),
    ("Conv2d 2 LOKR", "Conv2d", {"target_modules": ["conv2d", "lin0"]}),
    ("Conv2d 3 LOKR", "Conv2d", {"target_modules": ["conv2d"], "use_effective_conv2d": True}),
    ("Conv2d 4 LOKR", "Conv2d", {"target_modules": ["conv2d", "lin0"], "use_effective_conv2d": True}),
    ("Conv2d 1x1 LOKR", "Conv2d1x1", {"target_modules": ["conv2d"]}),
    ("Conv2d 5 LOKR", "Conv2d", {"target_modules": ["conv2d", "lin0"], "use_effective_conv2d": True,
                                 "decompose_both": True}),
    ("Conv2d 6 LOKR", "Conv2d", {"target_modules": ["conv2d", "lin0"], "use_effective_conv2d": True,
                                 "decompose_factor": 4}),
    ("Conv2d 7 LOKR", "Conv2d", {"target_modules": ["conv2d", "lin0"], "use_effective_conv2d": True,
                                 "decompose_both": True, "decompose_factor": 4}),
    ("Conv2d Groups LOKR", "Conv2dGroups", {"target_modules": ["conv2d"]}),
    ("Conv2d Groups2 LOKR", "Conv2dGroups2", {"target_modules": ["conv2d"]}),
]


@pytest.mark.parametrize("name, model, config", CASES, ids=[c[0] for c in CASES])
def test_peft_custom_model_cases(tmp_path, name, model, config):
    """Each case both ways through folders, and merged (fxpeft's merge equals its unmerged graph
    and PEFT's ``merge_and_unload``), with every factor random."""
    x = custom_input(model)
    peft_model = peft_lokr(lambda: custom_model(model), config)
    peft_model.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected = peft_model(x)
        assert (expected - custom_model(model)(x)).abs().max() > 1e-6
        gm = fxpeft.load(custom_model(model), tmp_path / "peft").eval()
        torch.testing.assert_close(gm(x), expected, rtol=0, atol=ATOL)
        back = PeftModel.from_pretrained(custom_model(model), str(fxpeft.save(gm, tmp_path / "ours"))).eval()
        torch.testing.assert_close(back(x), expected, rtol=0, atol=ATOL)
        merged, peft_merged = fxpeft.merge(gm), peft_model.merge_and_unload()
        torch.testing.assert_close(merged(x), gm(x), rtol=0, atol=ATOL)
        targets = config["target_modules"]
        for layer in [targets] if isinstance(targets, str) else targets:
            torch.testing.assert_close(merged.get_parameter(f"{layer}.weight"),
                                       peft_merged.get_parameter(f"{layer}.weight"), rtol=0, atol=1e-6)


MULTI_CASES = [("LoKr Same", ["lin0"], ["lin0"]), ("LoKr Different", ["lin0"], ["lin1"])]


@pytest.mark.parametrize("name, first, second", MULTI_CASES, ids=[c[0] for c in MULTI_CASES])
def test_peft_multiple_active_adapter_cases(tmp_path, name, first, second):
    """PEFT's two-adapter cases (``init_weights=False``): both active, they add up as in PEFT,
    and merging both gives the same outputs."""
    x = custom_input("MLP")
    peft_model = peft_lokr(lambda: custom_model("MLP"), {"target_modules": first})
    peft_model.add_adapter("other", LoKrConfig(target_modules=second, init_weights=False))
    peft_model.save_pretrained(tmp_path)  # the second adapter goes to a subfolder
    peft_model.base_model.set_adapter(["default", "other"])
    with torch.no_grad():
        combined = peft_model(x)
        gm = fxpeft.load(custom_model("MLP"), tmp_path)
        fxpeft.load(gm, tmp_path / "other", adapter="other")
        gm.set_adapter(["default", "other"])
        torch.testing.assert_close(gm(x), combined, rtol=0, atol=ATOL)
        gm.set_adapter("default")
        assert (gm(x) - combined).abs().max() > 1e-5
        gm.set_adapter(["default", "other"])
        torch.testing.assert_close(fxpeft.merge(gm)(x), combined, rtol=0, atol=ATOL)


# --- dropouts: training-time randomness ------------------------------------------------------------

def test_rank_and_module_dropout_act_in_train_mode_only():
    ids = token_batch()
    plain = lokr_graph(r=2)
    dropped = lokr_graph(r=2, rank_dropout=0.5, rank_dropout_scale=True, module_dropout=0.3)
    assert [n.target for n in dropped.graph.nodes].count(LYCORIS_DROPOUT) == 4
    torch.testing.assert_close(logits(dropped, ids), logits(plain, ids), rtol=0, atol=0)
    dropped.train()
    torch.manual_seed(0)
    first = logits(dropped, ids)
    torch.manual_seed(1)
    assert (first - logits(dropped, ids)).abs().max() > 1e-4  # other draws, other rows dropped
    torch.manual_seed(0)
    torch.testing.assert_close(logits(dropped, ids), first, rtol=0, atol=0)
    torch.testing.assert_close(logits(dropped.eval(), ids), logits(plain, ids), rtol=0, atol=0)


@pytest.mark.parametrize("scale", [False, True])
def test_train_mode_rank_dropout_draws_as_peft_does(tmp_path, scale):
    """Same seed, same rows dropped: PEFT's draws in PEFT's order (each module's keep, then its
    rows), so train-mode outputs equal PEFT's exactly."""
    config = dict(FAMILIES["llama"][1], r=2, decompose_both=True, rank_dropout=0.5, rank_dropout_scale=scale)
    peft_model = peft_lokr(tiny_llama, config)
    peft_model.save_pretrained(tmp_path)
    gm = fxpeft.load(tiny_llama(), tmp_path)
    peft_model.train(), gm.train()
    ids = token_batch()
    torch.manual_seed(7)
    theirs = logits(peft_model, ids)
    torch.manual_seed(7)
    torch.testing.assert_close(logits(gm, ids), theirs, rtol=0, atol=ATOL)
    assert (logits(gm.eval(), ids) - theirs).abs().max() > 1e-3


def test_rank_dropout_drops_whole_rows_of_the_delta():
    """Train mode, one linear: each output feature gets all of its delta or none of it (scaled
    by 1 / the kept fraction with ``rank_dropout_scale``)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 64))
    rule = Rule(where=Where(path=["^0$"]), params=LokrParams(r=2, init="random", rank_dropout=0.5,
                                                             rank_dropout_scale=True))
    gm = fxpeft.rewrite(net, rule).train()
    x = torch.randn(5, 16)
    with torch.no_grad():
        full = gm.eval()(x) - net(x)
        torch.manual_seed(3)
        part = gm.train()(x) - net(x)
    kept = (part.abs() > 1e-7).all(0)
    assert 0 < kept.sum() < 64 and (part.abs() <= 1e-7).all(0).eq(~kept).all()
    torch.testing.assert_close(part[:, kept], full[:, kept] * 64 / kept.sum(), rtol=1e-5, atol=1e-6)


# --- gradients, adapters, mixed batches -------------------------------------------------------------

def test_gradients_reach_only_lokr_parameters():
    gm = lokr_graph(r=2, decompose_both=True).train()
    ids = token_batch()
    gm(ids, labels=ids).loss.backward()
    assert_only_adapters_get_grads(gm)
    names = {n.rsplit(".", 1)[-1] for n, p in gm.named_parameters() if p.requires_grad}
    assert names == {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}


def test_named_adapters_switch_delete_and_mix_per_sample(tmp_path):
    gm = fxpeft.rewrite(tiny_llama(), RULES)
    gm.add_adapter("other", Rule(where=QV, params=LokrParams(r=1, decompose_both=True)))
    randomize_adapters(gm, seed=4)
    gm.eval()
    ids = token_batch()
    outputs = {}
    for name in ("default", "other"):
        gm.set_adapter(name)
        outputs[name] = logits(gm, ids)
    assert (outputs["default"] - outputs["other"]).abs().max() > 1e-3
    with gm.disable_adapters():
        outputs["__base__"] = logits(gm, ids)
    torch.testing.assert_close(outputs["__base__"], logits(tiny_llama(), ids), rtol=0, atol=0)
    names = ["other", "__base__", "default"]
    mixed = logits(gm, ids, adapter_names=names)
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], outputs[name][row], rtol=0, atol=ATOL)
    fused = fxpeft.fuse(gm, mixed=True)  # keeps every adapter, for mixed-batch serving
    torch.testing.assert_close(logits(fused, ids, adapter_names=names), mixed, rtol=0, atol=ATOL)
    alone = fxpeft.load(tiny_llama(), fxpeft.save(gm, tmp_path / "other", adapter="other"))
    torch.testing.assert_close(logits(alone, ids), outputs["other"], rtol=0, atol=ATOL)
    gm.set_adapter("default")
    gm.delete_adapter("other")
    assert not any("_other" in n for n, _ in gm.named_parameters())
    torch.testing.assert_close(logits(gm, ids), outputs["default"], rtol=0, atol=0)
    with pytest.raises(fxpeft.FxpeftError, match="cannot be named 'a': its parameter names would collide"):
        gm.add_adapter("a", RULES)


# --- dtypes, fuse, generate, compile --------------------------------------------------------------

def test_bf16_base_takes_fp32_adapters_and_equals_peft(tmp_path):
    make = lambda: tiny_llama().to(torch.bfloat16)  # noqa: E731
    peft_model = peft_lokr(make, FAMILIES["llama"][1])
    peft_model.save_pretrained(tmp_path)
    gm = fxpeft.load(make(), tmp_path)
    assert {p.dtype for n, p in gm.named_parameters() if "lokr_" in n} == {torch.float32}
    ids = token_batch()
    ours, theirs = logits(gm, ids), logits(peft_model, ids)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)


def test_fuse_leaves_lokr_working():
    gm = lokr_graph(r=2, decompose_both=True, rank_dropout=0.1)
    ids = token_batch()
    torch.testing.assert_close(logits(fxpeft.fuse(gm), ids), logits(gm, ids), rtol=0, atol=ATOL)


def test_greedy_generate_with_the_cache_equals_peft(tmp_path):
    gm = lokr_graph(r=2, alpha=8, decompose_both=True)
    with torch.no_grad():  # a larger delta, so the tokens differ from the base model's
        for name, param in gm.named_parameters():
            if "lokr_" in name:
                param.mul_(4)
    ids = token_batch(seq=7)
    ours = fxpeft.generate(gm, ids, max_new_tokens=6)
    peft_model = PeftModel.from_pretrained(tiny_llama(), str(fxpeft.save(gm, tmp_path / "a"))).eval()
    theirs = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                 do_sample=False)
    assert torch.equal(ours, theirs)
    with gm.disable_adapters():
        assert not torch.equal(fxpeft.generate(gm, ids, max_new_tokens=6), ours)


def test_compiles_with_fullgraph_forward_and_backward():
    """On the smallest model: a Conv2d with the CP-decomposed w2 (``lokr_t2``) and a linear with
    both factors low-rank, the LyCORIS dropouts in the graph (compiled, they draw from inductor's
    generator, so gradients are compared in eval mode, where they are off)."""
    torch.manual_seed(0)
    net = MODELS["Conv2d"]().eval()
    params = LokrParams(r=2, decompose_both=True, use_effective_conv2d=True, init="random",
                        rank_dropout=0.3, module_dropout=0.2)
    gm = fxpeft.rewrite(net, [Rule(match="conv", params=params),
                              Rule(where=Where(path=["^lin0$"]), params=params)]).eval()
    assert any(n.endswith("lokr_t2") for n, _ in gm.named_parameters())
    x = torch.randn(4, 45)
    torch._dynamo.reset()
    compiled = torch.compile(gm, fullgraph=True)
    compiled(x).sum().backward()
    grads = {n: p.grad.clone() for n, p in gm.named_parameters() if p.grad is not None}
    gm.zero_grad()
    gm(x).sum().backward()
    assert grads.keys() == {n for n, p in gm.named_parameters() if p.grad is not None} and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, gm.get_parameter(name).grad, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


# --- GPT-2's Conv1D, errors ------------------------------------------------------------------------

def test_gpt2_conv1d_works_in_fxpeft_though_peft_has_no_such_layer(tmp_path):
    """PEFT 0.21.2's LoKr refuses GPT-2's Conv1D (TypeError); fxpeft adapts the ``addmm`` site,
    merges it (the delta transposed to the stored ``[in, out]``) and round-trips its folder."""
    with pytest.raises(TypeError, match="Conv1D"):
        get_peft_model(tiny_gpt2(), LoKrConfig(target_modules=["c_attn"]))
    rule = Rule(where=Where(path=[r"c_attn$"]), params=LokrParams(r=2, decompose_both=True))
    model, ids = tiny_gpt2(), token_batch()
    gm = fxpeft.rewrite(model, rule).eval()
    torch.testing.assert_close(logits(gm, ids), logits(model, ids), rtol=0, atol=0)
    randomize_adapters(gm)
    assert (logits(gm, ids) - logits(model, ids)).abs().max() > 1e-3
    torch.testing.assert_close(logits(fxpeft.merge(gm), ids), logits(gm, ids), rtol=0, atol=ATOL)
    again = fxpeft.load(tiny_gpt2(), fxpeft.save(gm, tmp_path / "a"))
    torch.testing.assert_close(logits(again, ids), logits(gm, ids), rtol=0, atol=ATOL)


def test_errors_are_located_and_name_the_field(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('version = 1\n[[rule]]\nmatch = "linear"\nrewrite = "lokr"\n[rule.params]\n'
                   'decompose_factor = -2\n')
    with pytest.raises(fxpeft.FxpeftError, match=r"bad.toml:6: rule\[0\]\.params\.decompose_factor: "
                                                  r"expected -1 or a positive integer, got -2"):
        fxpeft.rewrite(tiny_llama(), str(bad))
    for field, value, message in [("init_weights", "gaussian", "init_weights = 'gaussian' is not supported"),
                                  ("rank_dropout", 1.5, r"rank_dropout: expected a number in \[0, 1\)")]:
        folder = tmp_path / field
        peft_lokr(tiny_llama, {"target_modules": ["q_proj"]}).save_pretrained(folder)
        saved = json.loads((folder / "adapter_config.json").read_text())
        saved[field] = value
        (folder / "adapter_config.json").write_text(json.dumps(saved))
        with pytest.raises(PeftFormatError, match=message) as error:
            fxpeft.load(tiny_llama(), folder)
        assert "\n" not in str(error.value)
