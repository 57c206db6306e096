"""LoHa: identity at init and the graph, PEFT parity both ways (Llama, OPT, PEFT's own custom
models with linears and 1-d / 2-d convolutions, the Tucker form, grouped convolutions), merge,
train-mode dropouts, named adapters and mixed batches, gradients, bf16 bases, fuse, KV-cached
generate, and torch.compile(fullgraph=True) forward and backward."""

import copy

import pytest
import torch
from peft import LoHaConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import fxpeft
from conftest import (REPO_ROOT, adapter_nodes, assert_only_adapters_get_grads, emitted_base,
                      randomize_adapters, tiny_gpt2, tiny_llama, tiny_opt, token_batch)
from fxpeft.errors import RuleError
from fxpeft.formats.peft_format import PeftFormatError
from fxpeft.kinds.loha import LohaParams, hadamard, tucker_hadamard
from fxpeft.kinds.lycoris import LYCORIS_DROPOUT
from fxpeft.names import ADAPTER_META
from fxpeft.rules import Rule, Where
from kind_checks import check_named_adapters
from peft_models import custom_input, custom_model

aten = torch.ops.aten
ATOL = 1e-5
RULES = str(REPO_ROOT / "passes" / "loha.toml")  # the bundled name resolves to the installed copy
FAMILIES = {"llama": tiny_llama, "opt": tiny_opt}
QV = ["q_proj", "v_proj"]


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def perturb(model, seed=1, scale=0.2):
    """Every LoHa tensor off its init (PEFT's names carry ``.default``; ours do not)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".hada_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def peft_loha(model, **config):
    return get_peft_model(model, LoHaConfig(**{"target_modules": QV, **config}))


def loha_graph(make=tiny_llama, seed=1, **overrides):
    gm = fxpeft.rewrite(make(), RULES, **overrides)
    perturb(gm, seed)
    return gm.eval()


# --- identity, the graph, errors ----------------------------------------------------------------

def test_identity_at_init_peft_shapes_and_the_graph():
    model, ids = tiny_llama(), token_batch()
    gm = fxpeft.rewrite(model, RULES)
    torch.testing.assert_close(logits(gm, ids), logits(model, ids), rtol=0, atol=0)
    shapes = {n: tuple(p.shape) for n, p in gm.named_parameters() if p.requires_grad}
    q, v = (64, 8), (32, 8)  # [out, r]; the b factors are [r, in] = (8, 64)
    assert shapes == {f"model.layers.{i}.self_attn.{proj}.hada_{w}": shape
                      for i in (0, 1) for proj, out in (("q_proj", q), ("v_proj", v))
                      for w, shape in (("w1_a", out), ("w1_b", (8, 64)), ("w2_a", out), ("w2_b", (8, 64)))}
    assert all(not p.any() for n, p in gm.named_parameters() if n.endswith("hada_w2_b"))
    assert all(p.abs().sum() > 0 for n, p in gm.named_parameters() if n.endswith(("w1_a", "w1_b", "w2_a")))
    gm.graph.lint()
    added = adapter_nodes(gm, "loha")
    joins = [n for n in added if n.meta[ADAPTER_META].removable]
    assert len(joins) == 4 and all(n.target == aten.add.Tensor for n in joins)
    targets = [n.target for n in added]
    assert targets.count(hadamard) == 4 and targets.count(aten.linear.default) == 4
    assert [n.op for n in added].count("get_attr") == 16
    assert {n.meta[ADAPTER_META].module_path for n in added} == {
        f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in QV}
    assert not hasattr(gm, LYCORIS_DROPOUT)  # no dropouts asked for, none spliced
    base = emitted_base(tiny_llama())
    gate_reads = len(gm.graph.nodes) - len(base.graph.nodes) - len(added)
    assert gate_reads == 2 * 4 + 2  # per site the buffer and its per-sample read; once the
    # adapter_names input and the Gates call


def test_bad_params_are_located_rule_errors_and_bad_configs_name_the_field():
    with pytest.raises(RuleError, match=r"params.rank_dropout: expected a number in \[0, 1\)"):
        LohaParams(rank_dropout=1.5)
    with pytest.raises(RuleError, match=r"params.use_effective_conv2d: expected true or false"):
        LohaParams(use_effective_conv2d="yes")
    with pytest.raises(PeftFormatError, match=r"init_weights = 'lycoris' is not supported"):
        fxpeft.rewrite(tiny_llama(), {"peft_type": "LOHA", "target_modules": QV, "init_weights": "lycoris"})
    with pytest.raises(PeftFormatError, match=r"rank_pattern must be a mapping"):
        fxpeft.rewrite(tiny_llama(), {"peft_type": "LOHA", "target_modules": QV, "rank_pattern": [1]})
    with pytest.raises(PeftFormatError, match=r"dora_simple = True is not supported by fxpeft's LOHA loader"):
        fxpeft.rewrite(tiny_llama(), {"peft_type": "LOHA", "target_modules": QV, "dora_simple": True})


# --- PEFT parity --------------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILIES))
def test_fxpeft_to_peft(tmp_path, family):
    make, ids = FAMILIES[family], token_batch()
    gm = loha_graph(make)
    folder = fxpeft.save(gm, tmp_path / "loha")
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    assert any(k.startswith("base_model.model.model.") and k.endswith("layers.0.self_attn.q_proj.hada_w1_a")
               for k in tensors)
    assert len(tensors) == len(fxpeft.adapter_state_dict(gm)) == 16
    peft_model = PeftModel.from_pretrained(make(), str(folder)).eval()
    assert peft_model.peft_config["default"].peft_type == "LOHA"
    expected = logits(gm, ids)
    torch.testing.assert_close(logits(peft_model, ids), expected, rtol=0, atol=ATOL)
    assert (expected - logits(make(), ids)).abs().max() > 1e-3


@pytest.mark.parametrize("family", list(FAMILIES))
def test_peft_to_fxpeft_with_patterns_and_dropouts(tmp_path, family):
    """rank_pattern / alpha_pattern pick per-module ranks and alphas; the dropouts are off in
    eval, on both sides."""
    make, ids = FAMILIES[family], token_batch()
    peft_model = peft_loha(make(), r=4, alpha=8, rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3},
                           rank_dropout=0.25, module_dropout=0.5, layers_to_transform=[1])
    perturb(peft_model)
    peft_model.save_pretrained(tmp_path)
    gm = fxpeft.load(make(), tmp_path)
    params = {n: tuple(p.shape) for n, p in gm.named_parameters() if n.endswith("hada_w1_a")}
    layer, v_out = ("model.layers.1", 32) if family == "llama" else ("model.decoder.layers.1", 64)
    assert params == {f"{layer}.self_attn.q_proj.hada_w1_a": (64, 4),
                      f"{layer}.self_attn.v_proj.hada_w1_a": (v_out, 2)}
    scales = {n.meta[ADAPTER_META].module_path: n.args[-2] for n in adapter_nodes(gm, "loha")
              if n.target == hadamard}
    assert scales == {f"{layer}.self_attn.q_proj": 3 / 4, f"{layer}.self_attn.v_proj": 8 / 2}
    torch.testing.assert_close(logits(gm.eval(), ids), logits(peft_model.eval(), ids), rtol=0, atol=ATOL)
    fxpeft.save(gm, tmp_path / "again")  # and back, with the same config
    again = PeftModel.from_pretrained(make(), str(tmp_path / "again")).eval()
    config = again.peft_config["default"]
    assert (config.rank_dropout, config.module_dropout) == (0.25, 0.5)
    ranks = {name.rsplit(".", 1)[1]: (m.r["default"], m.alpha["default"])
             for name, m in again.named_modules() if hasattr(m, "hada_w1_a")}
    assert ranks == {"q_proj": (4, 3), "v_proj": (2, 8)}
    torch.testing.assert_close(logits(again, ids), logits(peft_model, ids), rtol=0, atol=ATOL)


@pytest.mark.parametrize("rank_dropout, module_dropout", [(0.3, 0.0), (0.0, 0.5)])
def test_train_mode_dropouts_draw_peft_masks_and_eval_has_none(tmp_path, rank_dropout, module_dropout):
    """The dropouts follow gm.train() / gm.eval(); in train mode a seeded step draws PEFT's
    masks (with one of the two set; with both, PEFT skips the rank draw of a dropped update)."""
    ids = token_batch()
    peft_model = peft_loha(tiny_llama(), r=4, rank_dropout=rank_dropout, module_dropout=module_dropout)
    perturb(peft_model)
    peft_model.save_pretrained(tmp_path)
    gm = fxpeft.load(tiny_llama(), tmp_path)
    assert len(gm.graph.find_nodes(op="call_module", target=LYCORIS_DROPOUT)) == 4
    evaluated = logits(gm.eval(), ids)
    torch.testing.assert_close(evaluated, logits(peft_model.eval(), ids), rtol=0, atol=ATOL)
    torch.testing.assert_close(logits(gm, ids), evaluated, rtol=0, atol=0)  # no randomness in eval
    gm.train(), peft_model.train()
    assert getattr(gm, LYCORIS_DROPOUT).training
    for seed in range(3):
        torch.manual_seed(seed)
        ours = logits(gm, ids)
        torch.manual_seed(seed)
        torch.testing.assert_close(ours, logits(peft_model, ids), rtol=0, atol=ATOL)
        assert (ours - evaluated).abs().max() > 1e-3


def test_exclude_modules_and_modules_to_save_from_a_config():
    config = LoHaConfig(target_modules=["lin0", "lin1"], exclude_modules=["lin1"], r=2)
    gm = fxpeft.rewrite(custom_model("MLP"), config)
    assert {n.rsplit(".", 1)[0] for n in fxpeft.adapter_state_dict(gm)} == {"lin0"}
    kept = fxpeft.rewrite(custom_model("MLP"), LoHaConfig(target_modules=["lin0"], modules_to_save=["lin1"]))
    assert {n for n, p in kept.named_parameters() if p.requires_grad} >= {"lin1.modules_to_save.weight"}


def test_gpt2_conv1d_works_in_fxpeft_though_peft_has_no_loha_for_it(tmp_path):
    """GPT-2's Conv1D (addmm, weight [in, out]) is a linear site; PEFT 0.21.2's LoHa refuses
    Conv1D layers, so its folder round-trips through fxpeft only."""
    ids = token_batch()
    rule = Rule(where=Where(path=[r"c_attn$"]), params=LohaParams(r=4, init="random"))
    gm = fxpeft.rewrite(tiny_gpt2(), rule).eval()
    assert gm.get_parameter("transformer.h.0.attn.c_attn.hada_w1_a").shape == (192, 4)
    expected = logits(gm, ids)
    assert (expected - logits(tiny_gpt2(), ids)).abs().max() > 1e-3
    torch.testing.assert_close(logits(fxpeft.merge(gm), ids), expected, rtol=0, atol=ATOL)
    folder = fxpeft.save(gm, tmp_path / "gpt2")
    torch.testing.assert_close(logits(fxpeft.load(tiny_gpt2(), folder), ids), expected, rtol=0, atol=ATOL)
    with pytest.raises(TypeError, match="Conv1D"):
        PeftModel.from_pretrained(tiny_gpt2(), str(folder))


# --- PEFT's custom-model cases (tests/test_custom_models.py, LoHa), rebuilt here ----------------

# PEFT's Conv2dGroups model names its first linear lin0 and its head lin1; ours are lead and lin0.
CASES = [
    ("Vanilla MLP 1 LOHA", "MLP", {"target_modules": "lin0"}),
    ("Vanilla MLP 2 LOHA", "MLP", {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 LOHA", "MLP", {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 LOHA", "MLP", {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 LOHA", "MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 6 LOHA", "MLP", {"target_modules": ["lin0"], "alpha": 4, "module_dropout": 0.1}),
    ("Vanilla MLP 7 LOHA", "MLP", {"target_modules": "lin0", "rank_dropout": 0.5}),
    ("Conv2d 1 LOHA", "Conv2d", {"target_modules": ["conv2d"]}),
    ("Conv2d 2 LOHA", "Conv2d", {"target_modules": ["conv2d", "lin0"]}),
    ("Conv2d 3 LOHA", "Conv2d", {"target_modules": ["conv2d"], "use_effective_conv2d": True}),
    ("Conv2d 4 LOHA", "Conv2d", {"target_modules": ["conv2d", "lin0"], "use_effective_conv2d": True}),
    ("Conv1d LOHA", "Conv1d", {"target_modules": ["conv1d"]}),
    ("Conv1d LOHA 1", "Conv1d", {"target_modules": ["conv1d"]}),
    ("Conv1d LOHA 2", "Conv1d", {"target_modules": ["conv1d"], "r": 2}),
    ("Conv1d Groups LOHA", "Conv1dGroups", {"target_modules": ["conv1d"], "r": 4}),
    ("Conv1d LOHA 3", "Conv1dBigger", {"target_modules": ["conv1d"], "r": 2, "use_effective_conv2d": True}),
    ("Conv1d LOHA 4", "Conv1dBigger", {"target_modules": ["conv1d"], "r": 2, "use_effective_conv2d": False}),
    ("Conv2d 1x1 LOHA", "Conv2d1x1", {"target_modules": ["conv2d"]}),
    ("Conv2d Groups LOHA", "Conv2dGroups", {"target_modules": ["conv2d"]}),
    ("Conv2d Groups2 LOHA", "Conv2dGroups2", {"target_modules": ["conv2d"]}),
]


@pytest.mark.parametrize("name, model_id, config", CASES, ids=[c[0] for c in CASES])
def test_peft_custom_model_cases_both_ways_and_merged(tmp_path, name, model_id, config):
    x = custom_input(model_id)
    peft_model = get_peft_model(custom_model(model_id), LoHaConfig(**config)).eval()
    perturb(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    expected = peft_model(x)
    gm = fxpeft.load(custom_model(model_id), tmp_path / "peft").eval()
    torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=ATOL)
    folder = fxpeft.save(gm, tmp_path / "ours")
    back = PeftModel.from_pretrained(custom_model(model_id), str(folder)).eval()
    torch.testing.assert_close(back(x), expected, rtol=1e-5, atol=ATOL)
    merged = fxpeft.merge(gm)
    assert not adapter_nodes(merged, "loha")
    torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=ATOL)
    peft_merged = peft_model.merge_and_unload()
    for target in {n.meta[ADAPTER_META].detail.weight for n in adapter_nodes(gm, "loha")}:
        torch.testing.assert_close(merged.get_parameter(target), peft_merged.get_parameter(target),
                                   rtol=0, atol=1e-6)


MULTI_CASES = [("LoHa Same", ["lin0"], ["lin0"]), ("LoHa Different", ["lin0"], ["lin1"])]


@pytest.mark.parametrize("name, first, second", MULTI_CASES, ids=[c[0] for c in MULTI_CASES])
def test_peft_multiple_active_adapter_cases(tmp_path, name, first, second):
    """PEFT's MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES for LoHa: two adapters (init_weights=False),
    both active, add up; merging both gives the same outputs."""
    x = custom_input("MLP")
    peft_model = get_peft_model(custom_model("MLP"), LoHaConfig(target_modules=first, init_weights=False),
                                adapter_name="adapter_1").eval()
    peft_model.add_adapter("adapter_2", LoHaConfig(target_modules=second, init_weights=False))
    peft_model.save_pretrained(tmp_path)  # non-default adapters go to subfolders
    peft_model.base_model.set_adapter(["adapter_1", "adapter_2"])
    combined = peft_model(x)
    gm = fxpeft.load(custom_model("MLP"), tmp_path / "adapter_1", adapter="adapter_1")
    fxpeft.load(gm, tmp_path / "adapter_2", adapter="adapter_2")
    gm.set_adapter(["adapter_1", "adapter_2"])
    torch.testing.assert_close(gm(x), combined, rtol=1e-5, atol=ATOL)
    gm.set_adapter("adapter_1")
    assert (gm(x) - combined).abs().max() > 1e-5
    gm.set_adapter(["adapter_1", "adapter_2"])
    torch.testing.assert_close(fxpeft.merge(gm)(x), combined, rtol=1e-5, atol=ATOL)


def test_tucker_form_has_peft_shapes_and_1x1_kernels_stay_flat():
    tucker = Rule(match="conv", params=LohaParams(r=2, use_effective_conv2d=True))
    gm = fxpeft.rewrite(custom_model("Conv2d"), tucker)
    shapes = {n.rsplit(".", 1)[1]: tuple(p.shape) for n, p in gm.named_parameters() if ".hada_" in n}
    assert shapes == {"hada_t1": (2, 2, 3, 3), "hada_w1_a": (2, 10), "hada_w1_b": (2, 5),
                      "hada_t2": (2, 2, 3, 3), "hada_w2_a": (2, 10), "hada_w2_b": (2, 5)}
    assert [n.target for n in adapter_nodes(gm, "loha")].count(tucker_hadamard) == 1
    flat = fxpeft.rewrite(custom_model("Conv2d1x1"), tucker)
    assert flat.get_parameter("conv2d.hada_w1_b").shape == (2, 1)
    assert not any("hada_t" in n for n, _ in flat.named_parameters())
    x = custom_input("Conv2d")
    torch.testing.assert_close(gm(x), custom_model("Conv2d")(x), rtol=0, atol=0)  # identity at init


# --- merge, gradients, adapters -----------------------------------------------------------------

def test_merge_has_the_base_ops_and_equals_peft_merge(tmp_path):
    gm, ids = loha_graph(), token_batch()
    merged = fxpeft.merge(gm)
    merged.graph.lint()
    assert len(merged.graph.nodes) == len(emitted_base(tiny_llama()).graph.nodes)
    assert not any(".hada_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, ids), logits(gm, ids), rtol=0, atol=ATOL)
    folder = fxpeft.save(gm, tmp_path / "a")
    peft_merged = PeftModel.from_pretrained(tiny_llama(), str(folder)).merge_and_unload()
    name = "model.layers.1.self_attn.v_proj.weight"
    torch.testing.assert_close(merged.get_parameter(name), peft_merged.get_parameter(name), rtol=0, atol=1e-6)


def test_gradients_reach_only_loha_parameters():
    gm, ids = loha_graph(), token_batch()
    gm.train()
    gm(ids, labels=ids).loss.backward()
    assert_only_adapters_get_grads(gm)
    assert all(".hada_w" in n for n, p in gm.named_parameters() if p.requires_grad)


def test_named_adapters_switch_delete_and_mix_per_sample(tmp_path):
    gm = loha_graph()
    gm.add_adapter("other", RULES, r=4)
    perturb(gm, seed=5)
    assert gm.get_parameter("model.layers.0.self_attn.q_proj.hada_w1_a_other").shape == (64, 4)
    check_named_adapters(gm, tmp_path)


def test_bf16_base_gets_fp32_adapters_as_in_peft(tmp_path):
    ids = token_batch()
    peft_model = peft_loha(tiny_llama().to(torch.bfloat16), r=4)
    perturb(peft_model)
    peft_model.save_pretrained(tmp_path)
    gm = fxpeft.load(tiny_llama().to(torch.bfloat16), tmp_path)
    assert {p.dtype for n, p in gm.named_parameters() if ".hada_" in n} == {torch.float32}
    assert {p.dtype for n, p in peft_model.named_parameters() if ".hada_" in n} == {torch.float32}
    ours, theirs = logits(gm, ids), logits(peft_model.eval(), ids)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=0, atol=ATOL)


# --- fuse, generate, compile --------------------------------------------------------------------

def test_fuse_leaves_loha_working():
    gm, ids = loha_graph(rank_dropout=0.1), token_batch()
    gm.add_adapter("other", RULES)
    perturb(gm, seed=2)
    expected = logits(gm, ids)
    fused = fxpeft.fuse(gm)
    assert len([n for n in fused.graph.nodes if n.target in (hadamard, aten.linear.default)
                and ADAPTER_META in n.meta]) == 8  # the active adapter's branches, untouched
    torch.testing.assert_close(logits(fused.eval(), ids), expected, rtol=0, atol=ATOL)
    names = ["other", "default", "__base__"]
    torch.testing.assert_close(logits(fxpeft.fuse(gm, mixed=True).eval(), ids, adapter_names=names),
                               logits(gm, ids, adapter_names=names), rtol=0, atol=ATOL)


def test_greedy_generate_with_the_kv_cache_equals_peft(tmp_path):
    gm, ids = loha_graph(seed=3), token_batch(batch=2, seq=7)
    ours = fxpeft.generate(gm, ids, max_new_tokens=6)
    peft_model = PeftModel.from_pretrained(tiny_llama(), str(fxpeft.save(gm, tmp_path / "a"))).eval()
    theirs = peft_model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    assert ours.shape == (2, 13) and torch.equal(ours, theirs)
    with gm.disable_adapters():
        assert not torch.equal(fxpeft.generate(gm, ids, max_new_tokens=6), ours)


def test_compiles_with_fullgraph_forward_and_backward_with_dropouts():
    """Train mode, dropouts drawn: with inductor's ``fallback_random`` the compiled graph draws
    eager's masks, so its loss and gradients equal the eager graph's."""
    gm, ids = loha_graph(rank_dropout=0.2, module_dropout=0.1), token_batch()
    gm.train()
    torch._dynamo.reset()
    try:
        with torch._inductor.config.patch(fallback_random=True):
            compiled = torch.compile(gm, fullgraph=True, dynamic=True)
            torch.manual_seed(4)
            compiled_loss = compiled(ids, labels=ids).loss
            compiled_loss.backward()
        assert_only_adapters_get_grads(gm)
        compiled_grads = {n: p.grad.clone() for n, p in gm.named_parameters() if p.grad is not None}
        gm.zero_grad()
        torch.manual_seed(4)
        loss = gm(ids, labels=ids).loss
        loss.backward()
        torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=ATOL)
        for name, grad in compiled_grads.items():
            torch.testing.assert_close(grad, gm.get_parameter(name).grad, rtol=1e-4, atol=ATOL)
    finally:
        torch._dynamo.reset()
