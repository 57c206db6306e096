"""A fused LM-head loss: with ``labels`` in train mode, ``lm_head`` plus cross-entropy become a
chunked linear cross-entropy that never holds the full ``[tokens, vocab]`` logits or their
gradient (the idea of torchtune's ``LinearCrossEntropyLoss``, Liger's fused linear CE and Cut
Cross-Entropy). Each chunk's logits are made, turned into its loss and its input gradient, and
dropped; backward only scales the stored input gradient.

The loss is transformers' ``ForCausalLMLoss``: labels shifted left, ``ignore_index = -100``,
the mean over counted tokens, or the sum over ``num_items_in_batch`` when the ``Trainer`` passes
it. Outside train mode, or without labels, the head runs as before and returns logits; in train
mode with labels, ``.logits`` is None. ``fxpeft.fuse`` applies it (pass ``fuse_lm_loss``) only
where it is exact: a causal LM whose plain fp32 or bf16 ``lm_head`` carries no adapter. A bf16
head keeps transformers' casts: each chunk's logits are the bf16 GEMM's, upcast to fp32 for the
loss, and the logits' gradient is rounded to bf16 before the GEMMs back, as autograd does there.
"""

from __future__ import annotations

from typing import Any

import torch

from fxpeft.transforms.cpu_gemm import project

# Each chunk's logits (and their softmax, made beside them) stay under this many bytes: with a
# fixed token count, a batch of up to that many tokens made its whole [tokens, vocab] logits at
# once, the largest tensor of a fused step (two of them: 192 MiB at 512 tokens of a 49,152 vocab).
CHUNK_LOGITS_BYTES = 24 * 2 ** 20
MIN_CHUNK_TOKENS = 64  # below this the head's GEMM runs slowly on the CPU
IGNORE_INDEX = -100


def chunk_tokens(vocab: int, element_size: int) -> int:
    """How many tokens one chunk of the fused loss takes: as many as keep its logits within
    ``CHUNK_LOGITS_BYTES``, and at least ``MIN_CHUNK_TOKENS``.

    >>> chunk_tokens(49152, 4), chunk_tokens(128256, 4), chunk_tokens(1000, 4)
    (128, 64, 6291)
    """
    return max(MIN_CHUNK_TOKENS, CHUNK_LOGITS_BYTES // (vocab * element_size))


@torch.library.custom_op("fxpeft::chunked_linear_cross_entropy", mutates_args=())
def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sum of cross_entropy(hidden @ weight.T, targets) over the counted tokens, its gradient
    to hidden, its gradient to weight)`` chunk by chunk (the weight gradient is empty unless
    ``weight_grad``). One opaque op, so ``torch.compile`` keeps it whole, with no graph break,
    and AOTAutograd can cache the compiled graph.

    >>> h, w, y = torch.randn(5, 4), torch.randn(7, 4), torch.tensor([1, 2, -100, 3, 4])
    >>> total, dh, dw = chunked_linear_cross_entropy(h, w, y, False)
    >>> torch.allclose(total, torch.nn.functional.cross_entropy(h @ w.T, y, reduction="sum")), dw.shape
    (True, torch.Size([0]))
    """
    total = hidden.new_zeros((), dtype=torch.float32)
    grad_hidden = torch.zeros_like(hidden)
    # fp32 sums over chunks; a bf16 weight's gradient is rounded once, at the end
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight_grad else weight.new_empty(0)
    step = chunk_tokens(weight.shape[0], 4)  # the logits are fp32, whatever the head's dtype
    for start in range(0, hidden.shape[0], step):
        rows, wanted = hidden[start:start + step], targets[start:start + step]
        logits = project(rows, weight).float()  # oneDNN's GEMM on the CPU (fxpeft.transforms.cpu_gemm)
        counted = wanted != IGNORE_INDEX
        safe = torch.where(counted, wanted, 0)
        total += (torch.logsumexp(logits, -1) - logits.gather(1, safe[:, None])[:, 0])[counted].sum()
        dlogits = torch.softmax(logits, -1)
        dlogits[torch.arange(len(safe)), safe] -= 1
        dlogits *= counted[:, None]
        dlogits = dlogits.to(hidden.dtype)  # a bf16 head's logit gradient, as autograd rounds it
        grad_hidden[start:start + step] = project(dlogits, weight.t())
        if weight_grad:
            grad_weight += dlogits.T @ rows
    return total, grad_hidden, grad_weight.to(weight.dtype)


@chunked_linear_cross_entropy.register_fake
def _(hidden, weight, targets, weight_grad):
    return (hidden.new_empty((), dtype=torch.float32), torch.empty_like(hidden),
            weight.new_empty(weight.shape if weight_grad else (0,)))


def _keep_gradients(ctx: Any, inputs: tuple, output: tuple) -> None:
    ctx.save_for_backward(output[1], output[2])
    ctx.weight_grad = inputs[3]


def _scaled_gradients(ctx: Any, grad_total: torch.Tensor, *unused: Any) -> tuple:
    grad_hidden, grad_weight = ctx.saved_tensors
    return grad_hidden * grad_total, (grad_weight * grad_total if ctx.weight_grad else None), None, None


chunked_linear_cross_entropy.register_autograd(_scaled_gradients, setup_context=_keep_gradients)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         num_items_in_batch: Any = None) -> torch.Tensor:
    """transformers' causal-LM loss of ``hidden @ weight.T`` against ``labels``, chunked.

    >>> h, w, y = torch.randn(2, 5, 4), torch.randn(7, 4), torch.randint(0, 7, (2, 5))
    >>> from transformers.loss.loss_utils import ForCausalLMLoss
    >>> torch.allclose(linear_cross_entropy(h, w, y), ForCausalLMLoss(h @ w.T, y, 7), atol=1e-6)
    True
    """
    targets = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)
    total = torch.ops.fxpeft.chunked_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight,
                                                         targets, weight.requires_grad)[0]
    if num_items_in_batch is not None:
        return total / (num_items_in_batch.to(total.device) if torch.is_tensor(num_items_in_batch)
                        else num_items_in_batch)
    return total / (targets != IGNORE_INDEX).sum()


class LMHeadLoss(torch.nn.Module):
    """The head of a fused graph: ``(logits, None)``, or, in train mode with labels,
    ``(None, loss)`` without the full logits."""

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: Any,
                kwargs: dict[str, Any]) -> tuple[Any, Any]:
        if self.training and labels is not None:
            return None, linear_cross_entropy(hidden, weight, labels, kwargs.get("num_items_in_batch"))
        return torch.nn.functional.linear(hidden, weight), None
