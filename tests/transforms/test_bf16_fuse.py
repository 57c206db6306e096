"""``fxpeft.fuse`` on a bf16 base with fp32 LoRA adapters (PEFT's ``autocast_adapter_dtype``).

Tolerance: the fused copy reorders fp32 adapter sums (scale on the gate, one A for q and v) and
chunks the head's loss, so where a bf16 rounding falls can move by one step. Its error against
the unfused bf16 graph is held to the error bf16 itself makes against the same graph in fp32
(1.5x, measured 0.5-1.0x): fusing may not cost more precision than the base dtype already
costs. The loss, a mean over tokens in fp32, gets one bf16 step (2**-8, relative).
"""

import pytest
import torch

import fxpeft
from conftest import nodes_with_target, randomize_adapters, tiny_llama, token_batch
from fxpeft.transforms.cpu_gemm import native_bf16
from fxpeft.transforms.lm_loss import linear_cross_entropy

aten = torch.ops.aten
BF16_STEP = 2.0 ** -8
needs_native_bf16 = pytest.mark.skipif(
    not native_bf16(), reason="this CPU has no avx512_bf16 / amx_bf16: bf16 GEMMs are emulated, "
                              "and aten's bf16 linear is not oneDNN's native one")


def adapted(dtype: torch.dtype) -> torch.fx.GraphModule:
    gm = fxpeft.rewrite(tiny_llama().to(dtype), "lora_qv", dropout=0.0)
    randomize_adapters(gm)
    return gm


def train_step(model, ids) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    for param in model.parameters():
        param.grad = None
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.loss.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters()
                                       if p.grad is not None}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_fused_bf16_step_is_as_close_to_the_unfused_graph_as_bf16_is_to_fp32():
    ids = token_batch()
    reference, gm = adapted(torch.float32), adapted(torch.bfloat16)
    fused = fxpeft.fuse(gm)
    assert fused.graph.lint() is None
    loss32, grads32 = train_step(reference, ids)
    loss, grads = train_step(gm, ids)
    fused_loss, fused_grads = train_step(fused, ids)
    assert fused(ids, labels=ids).logits is None  # the bf16 head's loss is fused, as fp32's
    assert abs(float(fused_loss - loss)) <= BF16_STEP * abs(float(loss))
    assert set(fused_grads) == set(grads) == set(fxpeft.adapter_state_dict(gm))
    for name, grad in grads.items():
        assert fused_grads[name].dtype == torch.float32
        assert relative(fused_grads[name], grad) <= 1.5 * relative(grad, grads32[name]), name


def test_the_fused_loss_keeps_transformers_bf16_casts():
    from transformers.loss.loss_utils import ForCausalLMLoss
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 9, 16, generator=generator).bfloat16().requires_grad_()
    weight = torch.randn(40, 16, generator=generator).bfloat16().requires_grad_()
    labels = torch.randint(0, 40, (2, 9), generator=generator)
    fused = linear_cross_entropy(hidden, weight, labels)
    fused.backward()
    fused_grads = hidden.grad, weight.grad
    hidden.grad = weight.grad = None
    ForCausalLMLoss(hidden @ weight.T, labels, 40).backward()
    assert fused.dtype == torch.float32 and fused_grads[0].dtype == fused_grads[1].dtype == torch.bfloat16
    torch.testing.assert_close(fused, ForCausalLMLoss(hidden @ weight.T, labels, 40), rtol=BF16_STEP, atol=0)
    for mine, theirs in zip(fused_grads, (hidden.grad, weight.grad)):
        assert relative(mine, theirs) <= BF16_STEP


@needs_native_bf16
def test_bf16_base_linears_stay_on_aten_which_already_runs_onednn():
    x, w = torch.randn(37, 64).bfloat16(), torch.randn(96, 64).bfloat16()
    assert torch.equal(torch.nn.functional.linear(x, w), torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""))
    fused = fxpeft.fuse(adapted(torch.bfloat16))
    assert not nodes_with_target(fused, torch.ops.fxpeft.frozen_linear.default)
    assert len(nodes_with_target(fxpeft.fuse(adapted(torch.float32)), torch.ops.fxpeft.frozen_linear.default)) == 14


def adapter_casts(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The adapters' input casts (``aten.to.dtype`` nodes carrying an adapter record)."""
    from fxpeft.names import adapter_node
    return [n for n in nodes_with_target(gm, aten.to.dtype) if adapter_node(n) is not None]


def test_one_input_cast_per_lora_site_unfused_and_one_per_shared_input_fused():
    """PEFT casts x to the adapter dtype once per LoRA layer (q and v each cast the same norm
    output) and adds its fp32 output back with one cast; the unfused graph does as PEFT, the
    fused copy casts each layer's shared input once and joins q's and v's A projections."""
    from fxpeft.kinds.lora import add_in_dtype_of
    gm = adapted(torch.bfloat16)
    layers = gm.config.num_hidden_layers
    assert len(adapter_casts(gm)) == 2 * layers  # q and v
    assert len(nodes_with_target(gm, add_in_dtype_of)) == 2 * layers
    fused = fxpeft.fuse(gm)
    assert fused.graph.lint() is None
    assert len(adapter_casts(fused)) == layers
    assert len(nodes_with_target(fused, aten.to.dtype)) == len(nodes_with_target(gm, aten.to.dtype)) - layers
    assert len(nodes_with_target(fused, add_in_dtype_of)) == 2 * layers
    assert len(nodes_with_target(fused, aten.split_with_sizes.default)) == layers  # one A for q and v
    assert not adapter_casts(fxpeft.fuse(adapted(torch.float32)))  # fp32: nothing to cast


def test_the_fused_bf16_copy_is_the_identity_at_init_and_trains_only_adapters():
    ids = token_batch()
    base = tiny_llama().to(torch.bfloat16)
    fused = fxpeft.fuse(fxpeft.rewrite(tiny_llama().to(torch.bfloat16), "lora_qv", dropout=0.0))
    with torch.no_grad():
        assert torch.equal(fused.eval()(ids).logits, base(ids).logits)
    loss, grads = train_step(fused, ids)
    assert set(grads) == set(fxpeft.adapter_state_dict(fused))
    assert all(g.dtype == torch.float32 for g in grads.values())


def test_short_bf16_attention_runs_in_fp32_only_on_bf16_cpu_graphs():
    from fxpeft.transforms.cpu_attention import sdpa_fp32_when_short
    layers = tiny_llama().config.num_hidden_layers
    assert len(nodes_with_target(fxpeft.fuse(adapted(torch.bfloat16)), sdpa_fp32_when_short)) == layers
    assert not nodes_with_target(fxpeft.fuse(adapted(torch.float32)), sdpa_fp32_when_short)
    skipped = fxpeft.fuse(adapted(torch.bfloat16), skip=("fp32_short_attention",))
    assert not nodes_with_target(skipped, sdpa_fp32_when_short)


def _qkv(length: int, heads: int = 4, kv_heads: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shapes = [(2, heads, length, 8), (2, kv_heads, length, 8), (2, kv_heads, length, 8)]
    return [torch.randn(s, generator=generator).bfloat16().requires_grad_() for s in shapes]


def _sdpa(q, k, v, **kwargs) -> torch.Tensor:
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)


def test_sdpa_fp32_when_short_is_fp32_sdpa_up_to_the_limit_and_bf16_sdpa_past_it():
    from fxpeft.transforms.cpu_attention import SHORT_ATTENTION_TOKENS, sdpa_fp32_when_short
    q, k, v = _qkv(12)
    out = sdpa_fp32_when_short(q, k, v, enable_gqa=True, unmasked_is_causal=True)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, _sdpa(q.float(), k.float(), v.float(), is_causal=True).bfloat16())
    out.float().sum().backward()
    assert q.grad.dtype == k.grad.dtype == torch.bfloat16
    additive = torch.zeros(12, 12, dtype=torch.bfloat16).masked_fill(torch.ones(12, 12).triu(1).bool(), -1e4)
    assert torch.equal(sdpa_fp32_when_short(q, k, v, additive, enable_gqa=True),
                       _sdpa(q.float(), k.float(), v.float(), attn_mask=additive.float()).bfloat16())
    with torch.no_grad():  # inference: no backward to speed up, bf16 as before
        assert torch.equal(sdpa_fp32_when_short(q, k, v, enable_gqa=True), _sdpa(q, k, v))
    q, k, v = _qkv(SHORT_ATTENTION_TOKENS + 1, 2, 1)
    assert torch.equal(sdpa_fp32_when_short(q, k, v, is_causal=True, enable_gqa=True),
                       _sdpa(q, k, v, is_causal=True))
