"""Bottleneck adapters (AdapterHub's seq_bn, double_seq_bn, par_bn): outputs equal AdapterHub's
recorded ones (tests/data/bottleneck, written by make_fixture.py under adapters 1.3), through
fxpeft's own FXPEFT_BOTTLENECK folders; identity at init with "mam_adapter"; the graph; gradients;
named adapters and mixed batches; no merge; compile, bf16, fuse and KV-cached generate."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import fxpeft
from conftest import (REPO_ROOT, assert_only_adapters_get_grads, emitted_base, randomize_adapters,
                      tiny_bert, tiny_gpt2, tiny_llama, token_batch)
from fxpeft.capture.export import capture
from fxpeft.kinds.bottleneck import BottleneckParams
from fxpeft.match.query import match
from fxpeft.rules.loader import load_rules, parse_rules
from fxpeft.names import ADAPTER_META
from fxpeft.rules import Rule, Where

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "bottleneck"
META = json.loads((FIXTURE / "fixture.json").read_text())
ATOL = 1e-5
# AdapterHub's module holding the adapters -> the projection fxpeft names the site by.
LOCATIONS = [(r"\.attention\.output\.adapters\.[^.]+\.", ".attention.output.dense."),
             (r"\.output\.adapters\.[^.]+\.", ".output.dense."),
             (r"\.attention_adapters\.adapters\.[^.]+\.", ".self_attn.o_proj."),
             (r"\.output_adapters\.adapters\.[^.]+\.", ".mlp.down_proj.")]
GPT2_LOCATIONS = [(r"\.attention_adapters\.adapters\.[^.]+\.", ".attn.c_proj."),
                  (r"\.output_adapters\.adapters\.[^.]+\.", ".mlp.c_proj.")]
CONFIG_FIELDS = ("reduction_factor", "non_linearity", "is_parallel", "original_ln_before",
                 "original_ln_after", "residual_before_ln", "scaling", "dropout", "init_weights")
SEQ = Rule(match="residual", where=Where(path=[r"(^|\.)(layer\.\d+\.output\.dense|down_proj)$"]),
           params=BottleneckParams(reduction_factor=4))


def _fixture(prefix: str) -> dict[str, torch.Tensor]:
    with safe_open(FIXTURE / "fixture.safetensors", "pt") as f:
        return {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


def _base_model(family: str) -> torch.nn.Module:
    """The fixture's tiny model built by this transformers, with AdapterHub's run's weights."""
    import transformers
    spec = META["models"][family]
    name = spec["class"]
    for suffix in ("ForMaskedLM", "ForCausalLM", "LMHeadModel"):
        name = name.replace(suffix, "Config")
    config_class = getattr(transformers, name)
    model = getattr(transformers, spec["class"])(config_class(**spec["config"])).eval()
    state = _fixture(f"{family}/base/")
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model


def _fxpeft_key(adapterhub_key: str, family: str) -> str:
    for pattern, projection in GPT2_LOCATIONS if family == "gpt2" else LOCATIONS:
        key, found = re.subn(pattern, projection, adapterhub_key, count=1)
        if found:
            return "base_model.model." + key.replace("adapter_down.0.", "adapter_down.")
    raise AssertionError(f"no location for {adapterhub_key}")


def _folder(family: str, variant: str, tmp_path: Path) -> Path:
    """An FXPEFT_BOTTLENECK folder holding AdapterHub's adapter: its config fields, its weights
    under fxpeft's keys."""
    weights = {k: v for k, v in _fixture(f"{family}/{variant}/").items() if k != "logits"}
    tensors = {_fxpeft_key(k, family): v for k, v in weights.items()}
    paths = sorted({k.removeprefix("base_model.model.").rsplit(".", 2)[0] for k in tensors})
    hub = META["variants"][f"{family}/{variant}"]
    config = {"peft_type": "FXPEFT_BOTTLENECK", "target_modules": "|".join(map(re.escape, paths)),
              **{field: hub[field] for field in CONFIG_FIELDS}}
    folder = tmp_path / f"{family}_{variant}"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, folder / "adapter_model.safetensors")
    return folder


PARITY = sorted(key.split("/") for key in META["variants"])


@pytest.mark.parametrize("family,variant", PARITY, ids=["/".join(p) for p in PARITY])
def test_outputs_equal_adapterhub(family, variant, tmp_path):
    ids = _fixture(f"{family}/")["input_ids"]
    expected = _fixture(f"{family}/{variant}/")["logits"]
    base = _base_model(family)
    torch.testing.assert_close(base(input_ids=ids).logits, _fixture(f"{family}/")["base_logits"],
                               rtol=0, atol=ATOL)  # the same base model in both environments
    gm = fxpeft.load(base, _folder(family, variant, tmp_path))
    torch.testing.assert_close(gm(ids).logits, expected, rtol=0, atol=ATOL)
    assert (expected - _fixture(f"{family}/")["base_logits"]).abs().max() > 1e-2


# --- the kind on the conftest models ------------------------------------------------------------

VARIANTS = {"seq": dict(), "double_seq": dict(original_ln_before=False, non_linearity="swish"),
            "par": dict(parallel=True, original_ln_before=False, scaling=4.0)}


def _rule(path=r"(^|\.)(layer\.\d+\.(attention\.)?output\.dense|o_proj|down_proj|c_proj)$", **params):
    return Rule(match="residual", where=Where(path=[path]),
                params=BottleneckParams(**{"reduction_factor": 4, **params}))


def _adapted(model, seed=5, **params):
    gm = fxpeft.rewrite(model, [_rule(**params)])
    randomize_adapters(gm, seed=seed)
    return gm


def _bundled(name):  # by path: the worktree's passes/, whatever checkout fxpeft is installed from
    return load_rules(REPO_ROOT / "passes" / name)


def _matched(model, name):
    return [m.module_path for m in match(capture(model), _bundled(name)).matches]


def test_bundled_rule_files_select_the_output_projections():
    assert _matched(tiny_bert(), "bottleneck_seq.toml") == \
        [f"bert.encoder.layer.{i}.output.dense" for i in (0, 1)]
    assert _matched(tiny_llama(), "bottleneck_double_seq.toml") == \
        [f"model.layers.{i}.{p}" for i in (0, 1) for p in ("self_attn.o_proj", "mlp.down_proj")]
    assert _matched(tiny_gpt2(), "bottleneck_par.toml") == [f"transformer.h.{i}.mlp.c_proj" for i in (0, 1)]


def test_residual_sites_know_the_block_norm_and_the_branch():
    from fxpeft.match.residual import find_residual_sites
    bert = {s.module_path: s for s in find_residual_sites(capture(tiny_bert()))}
    assert len(bert) == 4 and all(s.norm is not None and s.hidden_size == 64 for s in bert.values())
    gpt2 = find_residual_sites(capture(tiny_gpt2()))
    # the last c_proj's sum is read only by the final ln_f: not its block's norm
    assert [s.norm for s in gpt2] == [None] * 4 and [s.branch_index for s in gpt2] == [0, 1, 0, 1]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("build", [tiny_bert, tiny_llama], ids=["bert", "llama"])
def test_identity_at_init_with_mam_adapter_init(variant, build):
    model, ids = build(), token_batch()
    gm = fxpeft.rewrite(model, [_rule(init="mam_adapter", **VARIANTS[variant])])
    out = gm(ids).logits
    torch.testing.assert_close(out, model(ids).logits, rtol=0, atol=0)
    assert all(p.abs().sum() == 0 for n, p in gm.named_parameters() if "adapter_up" in n)
    bert_init = fxpeft.rewrite(build(), [_rule(**VARIANTS[variant])])  # AdapterHub's default
    assert (bert_init(ids).logits - out).abs().max() > 0


def test_graph_records_one_removable_select_per_site():
    model = tiny_bert()
    base = emitted_base(model)
    gm = fxpeft.rewrite(model, _bundled("bottleneck_seq.toml"))
    gm.graph.lint()
    added = [n for n in gm.graph.nodes if ADAPTER_META in n.meta]
    joins = [n for n in added if n.meta[ADAPTER_META].removable]
    assert len(joins) == 2 and all(n.meta[ADAPTER_META].bypass == 0 for n in joins)
    for join in joins:
        assert join.args[0].target == torch.ops.aten.layer_norm.default  # the base's own norm
        assert all(ADAPTER_META not in u.meta for u in join.users)
    norms = [n for n in added if n.target == torch.ops.aten.layer_norm.default]
    assert len(norms) == 2  # LN(A(LN(h + r)) + h + r): the block's norm once more, same weights
    assert all(n.args[2:] == next(iter(n.users)).args[0].args[2:] for n in norms)
    # per site: down, act, up, mul, add, add, norm, select and 4 get_attrs... counted by kind
    per_site = [n.target for n in added if n.meta[ADAPTER_META].module_path.endswith("layer.0.output.dense")]
    assert per_site.count(torch.ops.aten.add.Tensor) == 2 and per_site.count(torch.ops.aten.relu.default) == 1
    assert len(gm.graph.nodes) > len(base.graph.nodes) + len(added)  # gates and their reads too


def test_gradients_reach_only_the_adapter_parameters():
    gm = _adapted(tiny_llama(), **VARIANTS["double_seq"]).train()
    ids = token_batch()
    gm(ids, labels=ids).loss.backward()
    assert_only_adapters_get_grads(gm)
    trainable = {n for n, p in gm.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * 2 * 4 and all(".adapter_down." in n or ".adapter_up." in n
                                                for n in trainable)


def test_merge_is_refused_with_the_reason():
    gm = _adapted(tiny_llama())
    with pytest.raises(fxpeft.FxpeftError, match="cannot be merged.*non-linearity"):
        fxpeft.merge(gm)


def test_named_adapters_switch_mix_in_a_batch_and_delete():
    model, ids = tiny_llama(), token_batch()
    gm = fxpeft.rewrite(model, [_rule()])
    gm.add_adapter("par", [_rule(**VARIANTS["par"])])
    randomize_adapters(gm, seed=7)
    outputs = {}
    for name in ("default", "par"):
        gm.set_adapter(name)
        outputs[name] = gm(ids).logits
    assert (outputs["default"] - outputs["par"]).abs().max() > 1e-3
    with gm.disable_adapters():
        torch.testing.assert_close(gm(ids).logits, model(ids).logits, rtol=0, atol=0)
    mixed = gm(ids, adapter_names=["par", "__base__", "default"]).logits
    torch.testing.assert_close(mixed[0], outputs["par"][0], rtol=0, atol=ATOL)
    torch.testing.assert_close(mixed[1], model(ids).logits[1], rtol=0, atol=ATOL)
    torch.testing.assert_close(mixed[2], outputs["default"][2], rtol=0, atol=ATOL)
    gm.delete_adapter("par")
    assert not any("_par" in n for n, _ in gm.named_parameters())
    gm.set_adapter("default")
    torch.testing.assert_close(gm(ids).logits, outputs["default"], rtol=0, atol=0)


def test_stacks_with_lora_on_the_same_projection():
    """A LoRA adapter spliced on down_proj first: the residual site follows its join."""
    model, ids = tiny_llama(), token_batch()
    gm = fxpeft.rewrite(model, "lora_all_linear.toml", init="random")
    lora_only = gm(ids).logits
    gm.add_adapter("bn", [_rule(init="mam_adapter")])
    gm.set_adapter("bn")
    torch.testing.assert_close(gm(ids).logits, model(ids).logits, rtol=0, atol=ATOL)
    gm.set_adapter("default")
    torch.testing.assert_close(gm(ids).logits, lora_only, rtol=0, atol=0)


def test_save_and_load_round_trip_in_fxpeft_format(tmp_path):
    model, ids = tiny_bert(), token_batch()
    gm = _adapted(model, residual_before_ln="post_add", non_linearity="gelu_new", scaling=0.5)
    folder = fxpeft.save(gm, tmp_path / "bn")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "FXPEFT_BOTTLENECK" and config["residual_before_ln"] == "post_add"
    assert {config[k] for k in ("reduction_factor", "non_linearity", "scaling")} == {4, "gelu_new", 0.5}
    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        assert "base_model.model.bert.encoder.layer.0.output.dense.adapter_down.weight" in f.keys()
    loaded = fxpeft.load(tiny_bert(), folder)
    torch.testing.assert_close(loaded(ids).logits, gm(ids).logits, rtol=0, atol=0)


def test_bad_params_and_config_fields_are_one_line_errors(tmp_path):
    with pytest.raises(fxpeft.RuleError, match="residual_before_ln"):
        BottleneckParams(residual_before_ln="after")
    with pytest.raises(fxpeft.RuleError, match="non_linearity"):
        BottleneckParams(non_linearity="softplus")
    folder = fxpeft.save(_adapted(tiny_llama()), tmp_path / "bn")
    config = json.loads((folder / "adapter_config.json").read_text())
    for field, value in (("ln_after", True), ("reduction_factor", 0), ("use_gating", True)):
        (folder / "adapter_config.json").write_text(json.dumps({**config, field: value}))
        (folder / "fxpeft_rules.toml").unlink(missing_ok=True)
        with pytest.raises(fxpeft.FxpeftError, match=field) as err:
            fxpeft.load(tiny_llama(), folder)
        assert "\n" not in str(err.value)
    with pytest.raises(fxpeft.FxpeftError, match="post_add.*original_ln_before"):
        fxpeft.rewrite(tiny_llama(), [_rule(original_ln_before=False, residual_before_ln="post_add")])


def test_rule_file_errors_are_located():
    text = ('[[rule]]\nmatch = "residual"\nrewrite = "bottleneck"\n[rule.params]\n'
            'non_linearity = "softplus"\n')
    with pytest.raises(fxpeft.RuleError, match=r"^bn\.toml:5: rule\[0\]\.params\.non_linearity: "
                                               r"expected one of 'relu'"):
        parse_rules(text, source="bn.toml")
    with pytest.raises(fxpeft.RuleError, match='applies to residual matches, not "linear"'):
        Rule(match="linear", params=BottleneckParams())


@pytest.mark.parametrize("init,check", [
    ("bert", lambda w: 0.015 < w.std() < 0.025),
    ("houlsby", lambda w: w.abs().max() <= 0.02 and 0.005 < w.std() < 0.01),
    ("mam_adapter", lambda w: w.abs().max() <= 1 / 64 ** 0.5)])  # down: kaiming-uniform(a=sqrt(5))
def test_init_weights_follow_adapterhub(init, check):
    torch.manual_seed(0)
    gm = fxpeft.rewrite(tiny_llama(), [_rule(init=init)])
    state = fxpeft.adapter_state_dict(gm)
    downs = [v for k, v in state.items() if k.endswith("adapter_down.weight")]
    ups = [v for k, v in state.items() if k.endswith("adapter_up.weight")]
    assert all(check(w) for w in downs) and all(v.abs().sum() == 0 for k, v in state.items()
                                                 if k.endswith(".bias"))
    assert all(check(w) for w in ups) if init != "mam_adapter" else all(w.abs().sum() == 0 for w in ups)


def test_bf16_base_with_fp32_adapters():
    ids = token_batch()
    gm32 = _adapted(tiny_bert())
    model = tiny_bert().to(torch.bfloat16)
    gm = fxpeft.rewrite(model, [_rule()])
    gm.load_state_dict(fxpeft.adapter_state_dict(gm32), strict=False)
    assert {p.dtype for n, p in gm.named_parameters() if p.requires_grad} == {torch.float32}
    out = gm(ids).logits
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), gm32(ids).logits, rtol=0, atol=0.1)
    identity = fxpeft.rewrite(model, [_rule(init="mam_adapter")])
    assert torch.equal(identity(ids).logits, model(ids).logits)


def test_fuse_leaves_the_adapter_working():
    gm = _adapted(tiny_llama(), **VARIANTS["seq"]).eval()
    ids = token_batch()
    torch.testing.assert_close(fxpeft.fuse(gm)(ids).logits, gm(ids).logits, rtol=0, atol=ATOL)


class _PostNormBlocks(torch.nn.Module):
    """Two post-norm blocks, ``LN(dense(x) + x)``: the smallest model with residual sites."""

    def __init__(self, width: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.dense = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(2))
        self.norm = torch.nn.ModuleList(torch.nn.LayerNorm(width) for _ in range(2))

    def forward(self, x):
        for dense, norm in zip(self.dense, self.norm):
            x = norm(dense(x) + x)
        return x


def test_compiles_with_fullgraph_forward_and_backward():
    gm = fxpeft.rewrite(_PostNormBlocks(), [_rule(path=r"^dense\.\d+$")])
    randomize_adapters(gm, seed=2)
    gm.train()
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    compiled = torch.compile(gm, fullgraph=True, dynamic=True)
    compiled(x).pow(2).mean().backward()
    compiled_grads = {n: p.grad.clone() for n, p in gm.named_parameters() if p.grad is not None}
    gm.zero_grad()
    gm(x).pow(2).mean().backward()
    assert len(compiled_grads) == 8 and compiled_grads.keys() == {
        n for n, p in gm.named_parameters() if p.grad is not None}
    for name, grad in compiled_grads.items():
        torch.testing.assert_close(grad, gm.get_parameter(name).grad, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_greedy_generate_with_the_kv_cache_equals_full_forwards():
    gm = _adapted(tiny_llama(), seed=3, **VARIANTS["double_seq"]).eval()
    ids = token_batch(batch=2, seq=6)
    ours = fxpeft.generate(gm, ids, max_new_tokens=8, eos_token_id=[])
    expected = ids
    with torch.no_grad():
        for _ in range(8):
            expected = torch.cat([expected, gm(expected).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(ours, expected)
    assert not torch.equal(ours, tiny_llama().generate(ids, max_new_tokens=8, do_sample=False,
                                                       eos_token_id=None))
