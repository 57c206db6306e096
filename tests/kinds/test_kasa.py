"""KaSA (PEFT's ``kasa_config``) on a tiny Llama's q / v: the base weight's r smallest singular
components taken off as a frozen low-rank correction (PEFT truncates the weight in place), a
learnable ``lora_diag`` between A and B. At init, PEFT's truncated model's outputs; outputs,
gradients and files equal PEFT's both ways; merge equal to PEFT's ``merge_and_unload``; the
graph, named adapters, generate, compile and bf16 bases; ``kasa_loss`` equal to PEFT's
``_get_kasa_loss``; what PEFT refuses, refused by name."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.config import KasaConfig
from safetensors.torch import load_file

import fxpeft
from conftest import adapter_nodes, assert_only_adapters_get_grads, tiny_gpt2, tiny_llama, token_batch
from fxpeft.kinds.kasa import dropped_part, kasa_loss
from fxpeft.kinds.lora import LoraParams
from fxpeft.rules import Rule, Where
from kind_checks import (bf16_llama, check_bf16_both_ways, check_compiles_whole, check_generate, check_merge,
                         check_named_adapters, logits, perturb)
from peft_io import matrix_case
from peft_models import custom_model

ATOL = 1e-5
Q = "model.layers.0.self_attn.q_proj"


def _config(**kwargs):
    return LoraConfig(**{"target_modules": ["q_proj", "v_proj"], "r": 4, "lora_alpha": 8,
                         "kasa_config": KasaConfig(beta=0.01, gamma=0.02), **kwargs})


def _adapter_params(model):
    return {n.removeprefix("base_model.model.").replace(".default", ""): p
            for n, p in model.named_parameters() if "lora_" in n}


def _twin(tmp_path):
    """PEFT's KaSA model, moved off its init, and fxpeft's loaded from its folder."""
    peft_model = get_peft_model(tiny_llama(), _config())
    perturb(peft_model, "lora_", seed=3, scale=0.2)
    peft_model.save_pretrained(tmp_path / "peft")
    return peft_model.eval(), fxpeft.load(tiny_llama(), tmp_path / "peft", trainable=True).eval()


def test_identity_at_init_is_peft_truncated_model_and_the_graph():
    ids = token_batch()
    torch.manual_seed(0)
    gm = fxpeft.rewrite(tiny_llama(), _config())
    peft_model = get_peft_model(tiny_llama(), _config()).eval()
    truncated = logits(peft_model, ids)
    torch.testing.assert_close(logits(gm, ids), truncated, rtol=0, atol=ATOL)
    assert (truncated - logits(tiny_llama(), ids)).abs().max() > 1e-3  # the truncation shows
    gm.graph.lint()
    ours = {n: tuple(p.shape) for n, p in gm.named_parameters() if p.requires_grad}
    assert ours == {n: tuple(p.shape) for n, p in _adapter_params(peft_model).items()}
    assert ours[f"{Q}.lora_diag"] == (4,)
    buffers = {n: (tuple(b.shape), b.requires_grad) for n, b in gm.named_buffers() if "kasa_" in n}
    assert buffers[f"{Q}.kasa_dropped_us"] == ((64, 4), False) and buffers[f"{Q}.kasa_dropped_vh"] == ((4, 64), False)
    assert len(buffers) == 2 * 4 and not any("kasa_" in n for n in gm.state_dict())
    joins = [n for n in adapter_nodes(gm) if n.meta["fxpeft_adapter"].removable]
    assert len(joins) == 4
    linears = [n for n in adapter_nodes(gm) if n.target is torch.ops.aten.linear.default]
    assert len(linears) == 4 * 4  # A, B, and the correction's two factors
    merged = fxpeft.merge(gm)
    assert not adapter_nodes(merged) and not any("kasa_" in n for n, _ in merged.named_buffers())
    torch.testing.assert_close(logits(merged, ids), truncated, rtol=0, atol=ATOL)


def test_dropped_part_is_what_peft_truncation_removes():
    weight = tiny_llama().get_submodule(Q).weight.detach()
    us, vh = dropped_part(weight, 4)
    peft_model = get_peft_model(tiny_llama(), _config())
    truncated = peft_model.base_model.model.get_submodule(Q).base_layer.weight.detach()
    torch.testing.assert_close(weight - us @ vh, truncated, rtol=0, atol=1e-6)


def test_outputs_gradients_and_only_adapters_train_as_peft(tmp_path):
    ids = token_batch()
    peft_model, gm = _twin(tmp_path)
    expected = logits(peft_model, ids)
    torch.testing.assert_close(logits(gm, ids), expected, rtol=0, atol=ATOL)
    peft_model.train(), gm.train()
    peft_model(input_ids=ids, labels=ids).loss.backward()
    gm(ids, labels=ids).loss.backward()
    assert_only_adapters_get_grads(gm)
    ours = dict(gm.named_parameters())
    theirs = _adapter_params(peft_model)
    assert ours.keys() - {n for n, p in ours.items() if not p.requires_grad} == theirs.keys()
    for name, param in theirs.items():
        torch.testing.assert_close(ours[name].grad, param.grad, rtol=1e-5, atol=1e-7)
    assert all(b.grad is None for n, b in gm.named_buffers() if "kasa_" in n)


def test_folders_both_ways_keys_config_and_merge(tmp_path):
    ids = token_batch()
    peft_model, gm = _twin(tmp_path)
    expected = logits(peft_model, ids)
    fxpeft.save(gm, tmp_path / "ours")
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert saved.keys() == load_file(tmp_path / "peft" / "adapter_model.safetensors").keys()
    assert f"base_model.model.{Q}.lora_diag" in saved and not any("kasa_" in k for k in saved)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["kasa_config"] == {"beta": 0.01, "gamma": 0.02}
    back = PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(back, ids), expected, rtol=0, atol=ATOL)
    check_merge(gm, _config(), "lora_")  # PEFT's merge_and_unload weights: truncated W + delta
    torch.testing.assert_close(logits(fxpeft.merge(gm), ids), expected, rtol=0, atol=ATOL)
    torch.testing.assert_close(logits(fxpeft.fuse(gm), ids), expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("options", [dict(lora_bias=True), dict(use_rslora=True, init_lora_weights=False)])
def test_kasa_with_other_lora_options_is_peft_both_ways_and_merged(tmp_path, options):
    errors = matrix_case("MLP", LoraConfig, dict(target_modules=["lin0"], kasa_config=KasaConfig(), r=4,
                                                 **options), tmp_path)
    assert max(errors.values()) <= ATOL, errors


def test_the_correction_reads_the_base_input_not_the_adapter_dropout():
    """PEFT's truncated base sees ``x``; only A sees the adapter's dropout."""
    gm = fxpeft.rewrite(tiny_llama(), _config(lora_dropout=0.1))
    linear = torch.ops.aten.linear.default
    reads = {n.args[1].target: n for n in gm.graph.nodes
             if n.target is linear and n.args[1].op == "get_attr"}
    assert reads[f"{Q}.kasa_dropped_vh"].args[0] is reads[f"{Q}.weight"].args[0]
    assert reads[f"{Q}.lora_A.weight"].args[0].op == "call_module"  # the adapter's dropout


def test_kasa_loss_is_peft_get_kasa_loss(tmp_path):
    peft_model, gm = _twin(tmp_path)
    theirs = peft_model.base_model._get_kasa_loss()
    ours = kasa_loss(gm)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    ours.backward()  # it trains A, B and lora_diag
    assert gm.get_parameter(f"{Q}.lora_diag").grad is not None
    assert kasa_loss(gm, []) == 0.0 and kasa_loss(fxpeft.rewrite(tiny_llama(), LoraConfig(target_modules=["q_proj"]))) == 0.0


def test_named_adapters_generate_and_compile(tmp_path):
    """A rule's ``kasa = true``: two KaSA adapters switch, mix per row and fuse, the base under
    ``disable_adapters`` (fxpeft never truncates it); generate is PEFT's; one compiled frame."""
    where = Where(path=[r"\.(q|v)_proj$"])
    gm = fxpeft.rewrite(tiny_llama(), Rule(where=where, params=LoraParams(r=4, kasa=True)))
    fxpeft.add_adapter(gm, "other", Rule(where=where, params=LoraParams(r=2, alpha=4, kasa=True)))
    perturb(gm, "lora_", seed=2, scale=0.3)
    gm.eval()
    check_named_adapters(gm, tmp_path)  # deletes "other": its buffers go too
    assert [n for n, _ in gm.named_buffers() if "kasa_" in n and n.endswith("_other")] == []
    check_generate(gm, tmp_path)
    check_compiles_whole(gm, token_batch())
    with pytest.raises(fxpeft.FxpeftError, match="combine cannot mix it"):
        fxpeft.combine(gm, {"default": 0.5}, "cat")


def test_export_lora_writes_the_whole_change_as_plain_lora_on_the_untouched_base(tmp_path):
    """PEFT has no convert_to_lora for KaSA; fxpeft's export: rank <= 2r, PEFT loads it."""
    ids = token_batch()
    _, gm = _twin(tmp_path)
    exported = fxpeft.export_lora(gm, tmp_path / "plain")
    assert exported.r <= 2 * 4
    plain = PeftModel.from_pretrained(tiny_llama(), tmp_path / "plain").eval()
    torch.testing.assert_close(logits(plain, ids), logits(gm, ids), rtol=0, atol=1e-4)


def test_bf16_base_matches_peft(tmp_path):
    peft_model = get_peft_model(bf16_llama(), _config())
    perturb(peft_model, "lora_", seed=3, scale=0.2)
    check_bf16_both_ways(peft_model.eval(), "lora_", tmp_path)
    gm = fxpeft.load(bf16_llama(), tmp_path / "peft")
    assert {b.dtype for n, b in gm.named_buffers() if "kasa_" in n} == {torch.float32}


def test_mixing_kasa_with_plain_lora_is_refused_as_in_peft(tmp_path):
    plain_config = LoraConfig(target_modules=["k_proj"])
    with pytest.raises(ValueError, match="KaSA cannot be combined"):
        get_peft_model(tiny_llama(), _config()).add_adapter("other", plain_config)
    get_peft_model(tiny_llama(), plain_config).save_pretrained(tmp_path / "plain")
    get_peft_model(tiny_llama(), _config()).save_pretrained(tmp_path / "kasa")
    gm = fxpeft.load(tiny_llama(), tmp_path / "kasa")
    with pytest.raises(fxpeft.FxpeftError, match="adapter 'other' does not use KaSA but adapter 'default' does"):
        fxpeft.load(gm, tmp_path / "plain", adapter="other")
    assert gm.adapter_names == ["default"]
    plain = fxpeft.load(tiny_llama(), tmp_path / "plain")
    with pytest.raises(fxpeft.FxpeftError, match="adapter 'other' uses KaSA but adapter 'default' does not"):
        fxpeft.load(plain, tmp_path / "kasa", adapter="other")
    assert plain.adapter_names == ["default"]


@pytest.mark.parametrize("model, config, message", [
    (tiny_gpt2, dict(target_modules=["c_attn"]), "c_attn: KaSA does not support fan_in_fan_out"),
    (tiny_llama, dict(r=64), r"needs r < min\(in_features, out_features\) = 64 \(as in PEFT\), got r = 64"),
    (tiny_llama, dict(use_dora=True), "KaSA does not combine with DoRA"),
    (tiny_llama, dict(target_modules=["embed_tokens"]), "embed_tokens: KaSA applies to linear layers only"),
])
def test_what_peft_refuses_is_refused_by_name(model, config, message):
    with pytest.raises(fxpeft.FxpeftError, match=message):
        fxpeft.rewrite(model(), _config(**config))
    with pytest.raises(ValueError):
        get_peft_model(model(), _config(**config))


@pytest.mark.parametrize("value, message", [
    ({"beta": -1}, r"kasa_config.beta: expected a number >= 0, got -1"),
    ({"beta": 1e-4, "delta": 2}, r"kasa_config must be a mapping with beta and gamma"),
    ("yes", r"kasa_config must be a mapping with beta and gamma"),
])
def test_a_bad_kasa_config_is_a_located_error(tmp_path, value, message):
    get_peft_model(tiny_llama(), _config()).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "kasa_config": value}))
    with pytest.raises(fxpeft.FxpeftError, match=f"adapter_config.json: {message}"):
        fxpeft.load(tiny_llama(), tmp_path)


def test_a_convolution_and_a_parameter_are_refused():
    with pytest.raises(fxpeft.FxpeftError, match="conv2d: KaSA applies to linear layers only"):
        fxpeft.rewrite(custom_model("Conv2d"), Rule(match="conv", where=Where(path=["conv2d"]),
                                                    params=LoraParams(r=2, kasa=True)))
    with pytest.raises(fxpeft.FxpeftError, match="KaSA applies to linear layers only"):
        fxpeft.rewrite(tiny_llama(), _config(target_modules=None, target_parameters=["q_proj.weight"]))
