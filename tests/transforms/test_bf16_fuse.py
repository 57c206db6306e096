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
