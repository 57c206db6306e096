"""Dtypes as PEFT has them: fp32 adapters on bf16 bases (autocast_adapter_dtype), casts where
PEFT puts them, PEFT's fp32 adapter files loading onto bf16 bases, and gm.to(torch.bfloat16).

Tolerance: both sides add an fp32 branch to the bf16 base output and round once to bf16, so
they agree to bf16 resolution; logits here are O(1), and bf16 carries 8 significant bits, so
1e-2 bounds one rounding step of the base path."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import fxpeft
from conftest import randomize_adapters, tiny_llama, token_batch
from fxpeft.kinds.lora import LoraParams
from fxpeft.rules import Rule, Where

BF16_ATOL = 1e-2


def bf16_llama():
    return tiny_llama().to(torch.bfloat16)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def adapter_dtypes(gm):
    return {p.dtype for n, p in gm.named_parameters() if n in fxpeft.adapter_state_dict(gm)}


@pytest.mark.parametrize("rules", ["lora_qv", "dora_qv", "ia3.toml"])
def test_fp32_adapters_on_a_bf16_base_are_identity_at_init_and_train(rules):
    model, ids = bf16_llama(), token_batch()
    gm = fxpeft.rewrite(model, rules)
    assert adapter_dtypes(gm) == {torch.float32}
    assert gm.get_parameter("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16
    out = gm.eval()(ids).logits
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, logits(model, ids), rtol=0, atol=0)
    randomize_adapters(gm)
    gm.train()(ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in gm.named_parameters() if p.grad is not None}
    assert grads and all(g.dtype == torch.float32 for g in grads.values())
    assert set(grads) == set(fxpeft.adapter_state_dict(gm))


def test_autocast_false_keeps_adapters_in_the_base_dtype():
    gm = fxpeft.rewrite(bf16_llama(), Rule(where=Where(path=["q_proj"]), params=LoraParams(autocast=False)))
    assert adapter_dtypes(gm) == {torch.bfloat16}


@pytest.mark.parametrize("use_dora", [False, True])
def test_a_peft_bf16_base_adapter_loads_with_parity_both_ways(tmp_path, use_dora):
    peft_model = get_peft_model(bf16_llama(), LoraConfig(r=8, lora_alpha=16, use_dora=use_dora,
                                                         target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                assert param.dtype == torch.float32  # PEFT's autocast_adapter_dtype
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(tmp_path / "peft")
    ids = token_batch()
    expected = logits(peft_model.eval(), ids)
    gm = fxpeft.load(bf16_llama(), tmp_path / "peft")  # fp32 tensors, bf16 base: loads
    assert adapter_dtypes(gm) == {torch.float32}
    torch.testing.assert_close(logits(gm, ids), expected, rtol=0, atol=BF16_ATOL)
    folder = fxpeft.save(gm, tmp_path / "ours")
    again = PeftModel.from_pretrained(bf16_llama(), str(folder)).eval()
    torch.testing.assert_close(logits(again, ids), logits(gm, ids), rtol=0, atol=BF16_ATOL)


def test_merge_on_a_bf16_base_keeps_bf16_weights():
    gm = fxpeft.rewrite(bf16_llama(), "lora_qv")
    gm.add_adapter("scale", "ia3.toml")
    randomize_adapters(gm)
    ids = token_batch()
    for name in ("default", "scale"):
        gm.set_adapter(name)
        merged = fxpeft.merge(gm)
        assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
        torch.testing.assert_close(logits(merged, ids), logits(gm.eval(), ids), rtol=0, atol=5e-2)
    gm.set_adapter("default")


def test_converting_a_graph_after_capture_is_a_clear_error_and_rewriting_a_bf16_model_works():
    """Export bakes the capture dtype into the graph: gm.to(torch.bfloat16) would fail deep
    inside torch, so it is refused, naming the way that works."""
    gm = fxpeft.rewrite(tiny_llama(), "llama_adapter.toml")
    for convert in (lambda: gm.to(torch.bfloat16), gm.bfloat16, gm.half,
                    lambda: gm.to("cpu", torch.float16)):
        with pytest.raises(fxpeft.FxpeftError, match=r"rewrite\(model.to\(torch"):
            convert()
    assert gm.to("cpu") is gm and gm.float() is gm  # no dtype change: fine
    ids = token_batch()
    for rules in ("lora_qv", "dora_qv", "ia3.toml", "llama_adapter.toml"):
        half = fxpeft.rewrite(bf16_llama(), rules)
        randomize_adapters(half)
        assert logits(half.eval(), ids).dtype == torch.bfloat16
