"""Dtypes as PEFT has them: fp32 adapters on bf16 bases (autocast_adapter_dtype), casts where
PEFT puts them, PEFT's fp32 adapter files loading onto bf16 bases, and gm.to(torch.bfloat16).

Tolerance: both sides add an fp32 branch to the bf16 base output and round once to bf16, so
they agree to bf16 resolution; logits here are O(1), and bf16 carries 8 significant bits, so
1e-2 bounds one rounding step of the base path."""


import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import fxpeft
from conftest import REPO_ROOT, assert_only_adapters_get_grads, randomize_adapters, tiny_llama, token_batch
from fxpeft.names import adapter_node
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


@pytest.mark.parametrize("rules", ["lora_qv", "dora_qv", "ia3.toml", "llama_adapter.toml",
                                   str(REPO_ROOT / "passes" / "prompt_tuning.toml"),
                                   str(REPO_ROOT / "passes" / "prefix_tuning.toml")])
def test_gm_to_bfloat16_after_rewriting_works_for_each_kind(rules):
    """A graph captured in fp32 cannot tell its fp32 upcasts from casts that follow the data,
    so converted it computes in bf16 throughout: its logits agree with the fp32 graph's, and
    with the graph of a model converted before rewriting, to a few bf16 roundings of O(1)
    logits (2e-2; measured about 6e-3)."""
    ids = token_batch()
    gm = fxpeft.rewrite(tiny_llama(), rules)
    randomize_adapters(gm)
    expected = logits(gm.eval(), ids)
    assert gm.to(torch.bfloat16) is gm
    out = logits(gm, ids)
    assert out.dtype == torch.bfloat16 and {p.dtype for p in gm.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=2e-2)
    before = fxpeft.rewrite(bf16_llama(), rules)
    before.load_state_dict(fxpeft.adapter_state_dict(gm), strict=False)
    torch.testing.assert_close(out.float(), logits(before.eval(), ids).float(), rtol=0, atol=2e-2)
    gm.train()(ids, labels=ids).loss.backward()
    assert_only_adapters_get_grads(gm)
    assert logits(gm.float().eval(), ids).dtype == torch.float32  # and back


def test_a_bf16_graph_converted_to_fp16_keeps_its_fp32_upcasts():
    gm = fxpeft.rewrite(bf16_llama(), "lora_qv")

    def dtype_constants(dtype):
        return sum(v == dtype for n in gm.graph.nodes if adapter_node(n) is None
                   for v in (*n.args, *n.kwargs.values()) if isinstance(v, torch.dtype))

    upcasts = dtype_constants(torch.float32)
    assert upcasts and dtype_constants(torch.bfloat16)
    gm.half()
    assert dtype_constants(torch.float32) == upcasts and dtype_constants(torch.bfloat16) == 0
    ids = token_batch()
    torch.testing.assert_close(logits(gm.eval(), ids).float(), logits(bf16_llama().half(), ids).float(),
                               rtol=0, atol=2e-2)
