"""VeRA: the shared projections drawn exactly as PEFT 0.21.2 draws them, identity at init, the
graph, PEFT parity both ways (Llama, GPT-2 Conv1D) with and without saved projections, merge,
named adapters and PEFT's checks for them, mixed batches, gradients, bf16, fuse, generate, and
torch.compile(fullgraph=True); then a slice of PEFT's custom-model VeRA cases."""

import warnings

import pytest
import torch
from peft import PeftModel, VeraConfig, get_peft_model
from safetensors.torch import load_file
from transformers.pytorch_utils import Conv1D

import fxpeft
from conftest import REPO_ROOT, adapter_nodes, emitted_base, tiny_gpt2, tiny_llama, token_batch
from fxpeft import registry
from fxpeft.kinds.vera import VeraParams, draw_projections
from fxpeft.names import ADAPTER_META, GATE_META
from fxpeft.rules import Rule, Where

aten = torch.ops.aten
ATOL = 1e-5
R = 16
RULES = REPO_ROOT / "passes" / "vera.toml"
LLAMA_RULE = Rule(where=Where(path=[r"(q|v)_proj$"]), params=VeraParams(r=R))
GPT2_RULE = Rule(where=Where(path=[r"c_attn$", r"mlp\.c_fc$"]),
                 params=VeraParams(r=R, prng_key=7, dropout=0.1))
FAMILIES = {"llama": (tiny_llama, LLAMA_RULE, dict(target_modules=["q_proj", "v_proj"])),
            "gpt2": (tiny_gpt2, GPT2_RULE, dict(target_modules=["c_attn", "mlp.c_fc"],
                                                projection_prng_key=7, fan_in_fan_out=True,
                                                vera_dropout=0.1))}
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # PEFT's save_projection notes


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


def perturb(model, seed=3):
    """Every lambda vector off its init (λ_b = 0 would hide the projections)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "vera_lambda" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def vera_graph(family="llama", **overrides):
    make, rule, _ = FAMILIES[family]
    gm = fxpeft.rewrite(make(), rule, **overrides)
    perturb(gm)
    return gm.eval()


def peft_vera(family="llama", **config):
    make, _, fields = FAMILIES[family]
    model = get_peft_model(make(), VeraConfig(r=R, **{**fields, **config}))
    perturb(model, seed=5)
    return model.eval()


def test_projections_are_drawn_as_peft_draws_them():
    """One pair per adapter, sized for the largest layer (GPT-2: c_fc's 256 outputs, c_attn's
    192), equal bit for bit to PEFT's for the same key."""
    gm = fxpeft.rewrite(tiny_gpt2(), GPT2_RULE)
    theirs = peft_vera("gpt2").base_model
    assert gm.get_buffer("vera_A.weight").shape == (R, 64) and gm.get_buffer("vera_B.weight").shape == (256, R)
    assert torch.equal(gm.get_buffer("vera_A.weight"), theirs.vera_A["default"])
    assert torch.equal(gm.get_buffer("vera_B.weight"), theirs.vera_B["default"])
    assert torch.equal(gm.get_buffer("vera_A.weight"), draw_projections(7, R, 64, 256)[0])


def test_identity_at_init_and_the_graph():
    model, ids = tiny_llama(), token_batch()
    gm = fxpeft.rewrite(model, RULES, r=R).eval()
    torch.testing.assert_close(logits(gm, ids), logits(model, ids), rtol=0, atol=0)
    gm.graph.lint()
    added = adapter_nodes(gm, "vera")
    joins = [n for n in added if n.meta[ADAPTER_META].removable]
    assert len(joins) == 4 and all(n.target == aten.add.Tensor for n in joins)
    assert sorted(n.meta[ADAPTER_META].module_path for n in joins) == \
        [f"model.layers.{i}.self_attn.{s}_proj" for i in (0, 1) for s in "qv"]  # not k, o, mlp
    assert len(added) == 11 * 4  # A, slice, linear, λ_d, mul, B, slice, linear, λ_b, mul, add
    slices = [n for n in added if n.target == aten.slice.Tensor]
    assert sorted(n.args[0].target for n in slices) == ["vera_A.weight"] * 4 + ["vera_B.weight"] * 4
    assert {n.args[1:] for n in slices if n.args[0].target == "vera_B.weight"} == {(0, 0, 64), (0, 0, 32)}
    assert sum(GATE_META in n.meta and n.target == aten.mul.Tensor for n in gm.graph.nodes) == 4
    assert {k: v.shape for k, v in gm.named_buffers() if k.startswith("vera_")} == \
        {"vera_A.weight": (R, 64), "vera_B.weight": (64, R)}
    trainable = {n for n, p in gm.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.self_attn.{s}_proj.vera_lambda_{v}" for i in (0, 1)
                         for s in "qv" for v in "bd"}
    lambda_d = gm.get_parameter("model.layers.0.self_attn.q_proj.vera_lambda_d")
    assert torch.equal(lambda_d, torch.full((R,), 0.1))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("save_projection", [True, False])
def test_peft_to_fxpeft(tmp_path, family, save_projection):
    """A PEFT folder loads with equal logits; without saved projections fxpeft draws them again
    from projection_prng_key, exactly."""
    peft_model = peft_vera(family, save_projection=save_projection)
    peft_model.save_pretrained(tmp_path)
    assert ("base_model.vera_A" in load_file(str(tmp_path / "adapter_model.safetensors"))) == save_projection
    gm = fxpeft.load(FAMILIES[family][0](), tmp_path)
    ids = token_batch()
    expected = logits(peft_model, ids)
    torch.testing.assert_close(logits(gm, ids), expected, rtol=0, atol=ATOL)
    assert (expected - logits(FAMILIES[family][0](), ids)).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("save_projection", [True, False])
def test_fxpeft_to_peft(tmp_path, family, save_projection):
    gm = vera_graph(family, save_projection=save_projection)
    folder = fxpeft.save(gm, tmp_path / "vera")
    ours = set(load_file(str(folder / "adapter_model.safetensors")))
    peft_vera(family, save_projection=save_projection).save_pretrained(tmp_path / "peft")
    assert ours == set(load_file(str(tmp_path / "peft" / "adapter_model.safetensors")))
    peft_model = PeftModel.from_pretrained(FAMILIES[family][0](), str(folder)).eval()
    assert peft_model.peft_config["default"].save_projection == save_projection
    ids = token_batch()
    torch.testing.assert_close(logits(peft_model, ids), logits(gm, ids), rtol=0, atol=ATOL)
    again = fxpeft.load(FAMILIES[family][0](), folder)  # through fxpeft_rules.toml
    torch.testing.assert_close(logits(again, ids), logits(gm, ids), rtol=0, atol=0)


def test_a_file_without_its_projections_is_refused_or_they_are_drawn(tmp_path):
    peft_vera().save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    from safetensors.torch import save_file
    save_file({k: v for k, v in tensors.items() if k != "base_model.vera_B"},
              str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(fxpeft.FxpeftError, match=r"save_projection = true, but the adapter file has "
                                                 r"no base_model.vera_B"):
        fxpeft.load(tiny_llama(), tmp_path)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merge_equals_unmerged_and_peft_merge_and_unload(family):
    gm = vera_graph(family)
    ids = token_batch()
    merged = fxpeft.merge(gm)
    merged.graph.lint()
    assert len(merged.graph.nodes) == len(emitted_base(FAMILIES[family][0]()).graph.nodes)
    assert not any("vera" in n for n, _ in [*merged.named_parameters(), *merged.named_buffers()])
    torch.testing.assert_close(logits(merged, ids), logits(gm, ids), rtol=0, atol=ATOL)
    peft_model = peft_vera(family)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "vera_lambda" in name:
                param.copy_(gm.get_parameter(name.replace("base_model.model.", "").replace(".default", "")))
    theirs = peft_model.merge_and_unload()
    for name, param in theirs.named_parameters():
        if ("q_proj" in name or "c_attn" in name) and name.endswith("weight"):
            torch.testing.assert_close(merged.get_parameter(name), param, rtol=0, atol=1e-6)


def test_gradients_reach_only_the_lambda_vectors():
    gm = vera_graph().train()
    ids = token_batch()
    gm(ids, labels=ids).loss.backward()
    with_grad = {n for n, p in gm.named_parameters() if p.grad is not None}
    assert with_grad == {n for n in fxpeft.adapter_state_dict(gm) if "vera_lambda" in n}
    assert all(gm.get_parameter(n).grad.abs().sum() > 0 for n in with_grad)
    assert not any(b.requires_grad for n, b in gm.named_buffers() if n.startswith("vera_"))
    assert {"vera_A.weight", "vera_B.weight"} <= set(fxpeft.adapter_state_dict(gm))


def _two_adapters():
    gm = fxpeft.rewrite(tiny_llama(), LLAMA_RULE)
    fxpeft.add_adapter(gm, "other", LLAMA_RULE)
    perturb(gm)
    return gm.eval()


def test_named_adapters_switch_mix_fuse_save_and_delete(tmp_path):
    gm, ids = _two_adapters(), token_batch()
    assert torch.equal(gm.get_buffer("vera_A_other.weight"), gm.get_buffer("vera_A.weight"))
    outputs = {}
    for name in ("default", "other"):
        gm.set_adapter(name)
        outputs[name] = logits(gm, ids)
        assert not any(b.requires_grad for n, b in gm.named_buffers() if n.startswith("vera_"))
    assert (outputs["default"] - outputs["other"]).abs().max() > 1e-3
    with gm.disable_adapters():
        base = logits(gm, ids)
    torch.testing.assert_close(base, logits(tiny_llama(), ids), rtol=0, atol=0)
    names = ["default", "other", "__base__"]
    mixed = logits(gm, ids, adapter_names=names)
    for row, expected in enumerate((outputs["default"], outputs["other"], base)):
        torch.testing.assert_close(mixed[row], expected[row], rtol=0, atol=ATOL)
    gm.set_adapter("default")
    torch.testing.assert_close(logits(fxpeft.fuse(gm), ids), outputs["default"], rtol=0, atol=ATOL)
    torch.testing.assert_close(logits(fxpeft.fuse(gm, mixed=True), ids, adapter_names=names), mixed,
                               rtol=0, atol=ATOL)
    folder = fxpeft.save(gm, tmp_path / "other", adapter="other")
    peft_model = PeftModel.from_pretrained(tiny_llama(), str(folder)).eval()
    torch.testing.assert_close(logits(peft_model, ids), outputs["other"], rtol=0, atol=ATOL)
    gm.delete_adapter("other")
    assert not any("_other" in n for n, _ in [*gm.named_parameters(), *gm.named_buffers()])
    torch.testing.assert_close(logits(gm, ids), outputs["default"], rtol=0, atol=0)


def test_two_peft_adapters_load_into_one_graph(tmp_path):
    """PEFT's second VeRA adapter reuses the first's projections: so does fxpeft's."""
    peft_model = get_peft_model(tiny_llama(), VeraConfig(r=R, target_modules=["q_proj", "v_proj"]))
    peft_model.add_adapter("other", VeraConfig(r=R, target_modules=["v_proj"]))
    perturb(peft_model)
    peft_model.save_pretrained(tmp_path)
    gm = fxpeft.load(tiny_llama(), tmp_path)
    fxpeft.load(gm, tmp_path / "other", adapter="other")
    ids = token_batch()
    for name in ("default", "other"):
        peft_model.set_adapter(name)
        gm.set_adapter(name)
        torch.testing.assert_close(logits(gm, ids), logits(peft_model.eval(), ids), rtol=0, atol=ATOL)


@pytest.mark.parametrize("second, message", [
    (Rule(where=Where(path=[r"q_proj$"]), params=VeraParams(r=R)), r"vera_B has a size of 32 but 64"),
    (Rule(where=Where(path=[r"v_proj$"]), params=VeraParams(r=8)), r"has r = 8, but it reuses .* rank 16"),
    (Rule(where=Where(path=[r"v_proj$"]), params=VeraParams(r=R, prng_key=1)), r"prng_key = 1 differs"),
    (Rule(where=Where(path=[r"v_proj$"]), params=VeraParams(r=R, save_projection=False)),
     r"save_projection = False differs"),
])
def test_a_second_adapter_must_fit_the_first_ones_projections(second, message):
    """PEFT's checks, as clear errors that leave the graph as it was (PEFT raises ValueError for
    each; a smaller rank it accepts, then fails in forward)."""
    gm = fxpeft.rewrite(tiny_llama(), Rule(where=Where(path=[r"v_proj$"]), params=VeraParams(r=R)))
    with pytest.raises(fxpeft.FxpeftError, match=message):
        fxpeft.add_adapter(gm, "other", second)
    assert gm.adapter_names == ["default"] and not hasattr(gm, "vera_A_other")


def test_one_adapter_has_one_rank_and_key():
    rules = [Rule(where=Where(path=[r"q_proj$"]), params=VeraParams(r=R)),
             Rule(where=Where(path=[r"v_proj$"]), params=VeraParams(r=R, prng_key=2))]
    with pytest.raises(fxpeft.FxpeftError, match="must share r, prng_key and save_projection"):
        fxpeft.rewrite(tiny_llama(), rules)


def test_bad_params_and_unsupported_peft_fields_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rule]]\nmatch = "linear"\nrewrite = "vera"\n[rule.where]\npath = ["q_proj$"]\n'
                   '[rule.params]\nr = 0\n')
    with pytest.raises(fxpeft.RuleError, match=r"bad.toml:7: rule\[0\].params.r: expected a positive"):
        fxpeft.rewrite(tiny_llama(), bad)
    for field, value in (("bias", "all"), ("use_something", True)):
        peft_vera().save_pretrained(tmp_path / field)
        config = tmp_path / field / "adapter_config.json"
        import json
        config.write_text(json.dumps({**json.loads(config.read_text()), field: value}))
        with pytest.raises(fxpeft.FxpeftError, match=rf"adapter_config.json: {field} = ") as err:
            fxpeft.load(tiny_llama(), tmp_path / field)
        assert "\n" not in str(err.value)


def test_bf16_base_with_fp32_adapters_equals_peft(tmp_path):
    peft_model = get_peft_model(tiny_llama().to(torch.bfloat16),
                                VeraConfig(r=R, target_modules=["q_proj", "v_proj"]))
    perturb(peft_model)
    peft_model.save_pretrained(tmp_path)
    gm = fxpeft.load(tiny_llama().to(torch.bfloat16), tmp_path)
    assert {p.dtype for n, p in gm.named_parameters() if "vera" in n} == {torch.float32}
    assert gm.get_buffer("vera_A.weight").dtype == torch.float32
    ids = token_batch()
    ours, theirs = logits(gm, ids), logits(peft_model.eval(), ids)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-2)


def test_vera_is_not_a_low_rank_branch_to_the_fuse_passes():
    """λ_d sits between A and the gate and λ_b is a vector: gathering or rescaling "A and B"
    would compute something else, so the kind does not declare ``low_rank`` and fuse leaves its
    branches whole."""
    assert registry.get("vera").low_rank is None
    gm, ids = vera_graph(), token_batch()
    fused = fxpeft.fuse(gm)
    fused.graph.lint()
    assert len(adapter_nodes(fused, "vera")) == len(adapter_nodes(gm, "vera"))
    torch.testing.assert_close(logits(fused, ids), logits(gm, ids), rtol=0, atol=ATOL)


def test_greedy_generate_with_the_kv_cache_equals_peft(tmp_path):
    gm = vera_graph()
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3], ids[0, :3] = 0, 0
    ours = fxpeft.generate(gm, ids, max_new_tokens=6, attention_mask=mask)
    peft_model = PeftModel.from_pretrained(tiny_llama(), str(fxpeft.save(gm, tmp_path / "v"))).eval()
    theirs = peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(ours, theirs)


def test_compiles_with_fullgraph_forward_and_backward():
    gm, ids = vera_graph().train(), token_batch()

    def loss_and_grads(model):
        gm.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in gm.named_parameters() if p.grad is not None}

    torch._dynamo.reset()
    compiled = loss_and_grads(torch.compile(gm, fullgraph=True, dynamic=True))
    eager = loss_and_grads(gm)
    assert len(eager[1]) == 8 and compiled[1].keys() == eager[1].keys()
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


# --- PEFT's custom-model VeRA cases (tests/test_custom_models.py), our own slice --------------

class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1 = torch.nn.Linear(10, 20), torch.nn.Linear(20, 2)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.lin1(self.drop(torch.relu(self.lin0(x)))), dim=-1)


class EmbConv1D(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.conv1d = torch.nn.Embedding(100, 5), Conv1D(1, 5)
        self.lin0 = torch.nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.conv1d(self.emb(x))).flatten(1)
        return torch.log_softmax(self.lin0(hidden), dim=-1)


def _model(name):
    torch.manual_seed(0)
    return {"MLP": MLP, "EmbConv1D": EmbConv1D}[name]().eval()


def _inputs(name):
    generator = torch.Generator().manual_seed(2)
    if name == "EmbConv1D":
        return torch.randint(0, 100, (4, 10), generator=generator)
    return torch.randn(4, 10, generator=generator)


CUSTOM_CASES = [
    ("Vanilla MLP 1 VeRA", "MLP", {"target_modules": "lin0"}),
    ("Vanilla MLP 2 VeRA", "MLP", {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 VeRA", "MLP", {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 VeRA", "MLP", {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 VeRA", "MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Embedding + transformers Conv1D 1 VeRA", "EmbConv1D", {"target_modules": ["conv1d"]}),
]


@pytest.mark.parametrize("name, model, config", CUSTOM_CASES, ids=[c[0] for c in CUSTOM_CASES])
def test_peft_custom_model_cases_both_ways(tmp_path, name, model, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(_model(model), VeraConfig(init_weights=False, **config)).eval()
    perturb(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    x = _inputs(model)
    with torch.no_grad():
        expected = peft_model(x)
    gm = fxpeft.load(_model(model), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(gm(x), expected, rtol=0, atol=ATOL)
        assert (expected - _model(model)(x)).abs().max() > 1e-4
    back = PeftModel.from_pretrained(_model(model), str(fxpeft.save(gm, tmp_path / "ours"))).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), expected, rtol=0, atol=ATOL)


def test_peft_custom_case_vera_same_two_active_adapters(tmp_path):
    """PEFT's multiple-active-adapters case "VeRA Same": two adapters on lin0, both active."""
    config = dict(target_modules=["lin0"], init_weights=False)
    torch.manual_seed(0)
    peft_model = get_peft_model(_model("MLP"), VeraConfig(**config), adapter_name="adapter_1")
    peft_model.add_adapter("adapter_2", VeraConfig(**config))
    peft_model.save_pretrained(tmp_path)
    gm = fxpeft.load(_model("MLP"), tmp_path / "adapter_1", adapter="adapter_1")
    fxpeft.load(gm, tmp_path / "adapter_2", adapter="adapter_2")
    peft_model.base_model.set_adapter(["adapter_1", "adapter_2"])
    gm.set_adapter(["adapter_1", "adapter_2"])
    x = _inputs("MLP")
    with torch.no_grad():
        torch.testing.assert_close(gm.eval()(x), peft_model.eval()(x), rtol=0, atol=ATOL)


class MLP2xSameShape(torch.nn.Module):
    """lin1 and lin2 have the same shape, so two adapters on either share a projection pair."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin3 = torch.nn.Linear(10, 20), torch.nn.Linear(20, 2)
        self.lin1, self.lin2 = torch.nn.Linear(20, 20), torch.nn.Linear(20, 20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.lin1(torch.relu(self.lin0(x))))
        return torch.log_softmax(self.lin3(torch.relu(self.lin2(x))), dim=-1)


@pytest.mark.parametrize("first, second", [(["lin1"], ["lin2"]), (["lin1", "lin2"], ["lin1", "lin2"])],
                         ids=["different targets", "same targets"])
def test_peft_custom_case_requires_grad_of_two_adapters(first, second):
    """PEFT's ``test_requires_grad_vera_*``: only the active adapter's lambdas train, and the
    projections never do."""
    torch.manual_seed(0)
    gm = fxpeft.rewrite(MLP2xSameShape(), Rule(where=Where(path=[f"^{n}$" for n in first]), params=VeraParams()))
    fxpeft.add_adapter(gm, "adapter1", Rule(where=Where(path=[f"^{n}$" for n in second]), params=VeraParams()))
    suffix = {"default": "", "adapter1": "_adapter1"}
    targets = {"default": first, "adapter1": second}
    for active in ("default", "adapter1"):
        gm.set_adapter(active)
        trainable = {n for n, p in gm.named_parameters() if p.requires_grad}
        assert trainable == {f"{m}.vera_lambda_{v}{suffix[active]}" for m in targets[active] for v in "bd"}
        assert not any(b.requires_grad for b in gm.buffers())
