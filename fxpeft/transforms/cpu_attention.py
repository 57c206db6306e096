"""bf16 attention on the CPU, in fp32 where that is faster.

PyTorch's CPU flash attention (2.13) is slow in bf16 on short sequences when gradients are
needed: measured on an AVX-512 BF16 CPU (no AMX), one thread, causal, forward and backward, bf16
took 1.35-2.5x fp32's time at 64-128 keys (heads 9/3, 32/8, 16/16; head dim 64 and 128), 1.0-1.25x
at 256-384, 0.9-1.07x at 512 and 0.76x at 1024, where bf16 wins. The fp32 call with its casts (q,
k and v up, the output back) took 0.39-0.79x the bf16 call's time at 64-128 keys, 0.83-1.01x at
256-384 and 0.96-1.10x at 512; so up to ``SHORT_ATTENTION_TOKENS`` keys, with gradients on, a
bf16 SDPA runs in fp32, which is also the more exact of the two. The forward alone is about as
fast in either dtype, so without gradients nothing changes.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx

from fxpeft.transforms.causal_mask import masked_or_causal_sdpa

aten = torch.ops.aten
SHORT_ATTENTION_TOKENS = 384  # the longest key length where fp32 still won in every shape measured
UPCAST_DTYPES = (torch.bfloat16,)  # fp16 was not measured


def _upcasts(query: torch.Tensor, key: torch.Tensor) -> bool:
    """Whether this call runs in fp32: a bf16 CPU call with gradients on and short keys."""
    return query.device.type == "cpu" and query.dtype in UPCAST_DTYPES and torch.is_grad_enabled() \
        and key.shape[-2] <= SHORT_ATTENTION_TOKENS


def sdpa_fp32_when_short(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                         is_causal: bool = False, *, scale: Optional[float] = None,
                         enable_gqa: bool = False, unmasked_is_causal: bool = False) -> torch.Tensor:
    """SDPA (causal also when ``unmasked_is_causal`` and no mask: ``masked_or_causal_sdpa``), in
    fp32 where ``_upcasts`` says so, its output cast back to the inputs' dtype.

    >>> q = torch.randn(1, 2, 4, 8, dtype=torch.bfloat16, requires_grad=True)
    >>> out = sdpa_fp32_when_short(q, q, q, unmasked_is_causal=True)
    >>> ref = torch.nn.functional.scaled_dot_product_attention(q.float(), q.float(), q.float(), is_causal=True)
    >>> out.dtype, torch.equal(out, ref.bfloat16())
    (torch.bfloat16, True)
    """
    causal = is_causal or (unmasked_is_causal and attn_mask is None)
    if not _upcasts(query, key):
        return aten.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, causal,
                                                 scale=scale, enable_gqa=enable_gqa)
    if attn_mask is not None and attn_mask.is_floating_point():
        attn_mask = attn_mask.float()  # an additive mask, in the dtype of the scores
    out = aten.scaled_dot_product_attention(query.float(), key.float(), value.float(), attn_mask,
                                            dropout_p, causal, scale=scale, enable_gqa=enable_gqa)
    return out.to(query.dtype)


def _bf16_cpu_query(node: torch.fx.Node) -> bool:
    value = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
    return isinstance(value, torch.Tensor) and value.dtype in UPCAST_DTYPES and value.device.type == "cpu"


def fp32_short_attention(gm: torch.fx.GraphModule) -> int:
    """Every SDPA call on bf16 CPU queries (aten's, or ``causal_mask``'s) becomes
    ``sdpa_fp32_when_short``, which decides per call; returns how many changed."""
    changed = 0
    for target, causal in ((aten.scaled_dot_product_attention.default, False), (masked_or_causal_sdpa, True)):
        for node in list(gm.graph.find_nodes(op="call_function", target=target)):
            if _bf16_cpu_query(node):
                node.target = sdpa_fp32_when_short
                node.kwargs = {**node.kwargs, "unmasked_is_causal": causal}
                changed += 1
    if changed:
        gm.recompile()
    return changed
