"""A fused LM-head loss: with ``labels`` in train mode, ``lm_head`` plus cross-entropy become a
chunked linear cross-entropy that never holds the full ``[tokens, vocab]`` logits or their
gradient (the idea of torchtune's ``LinearCrossEntropyLoss``, Liger's fused linear CE and Cut
Cross-Entropy). Each chunk's logits are made, turned into its loss and its input gradient, and
dropped; backward only scales the stored input gradient.

The loss is transformers' ``ForCausalLMLoss``: labels shifted left, ``ignore_index = -100``,
the mean over counted tokens, or the sum over ``num_items_in_batch`` when the ``Trainer`` passes
it. Outside train mode, or without labels, the head runs as before and returns logits; in train
mode with labels, ``.logits`` is None. ``fxpeft.fuse`` applies it (pass ``fuse_lm_loss``) only
where it is exact: a causal LM whose plain fp32 ``lm_head`` carries no adapter.
"""

from __future__ import annotations

from typing import Any

import torch

CHUNK_TOKENS = 1024
IGNORE_INDEX = -100


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """``sum(cross_entropy(h @ W.T, targets))`` over the counted tokens, chunk by chunk."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros_like(weight) if weight.requires_grad else None
        for start in range(0, hidden.shape[0], CHUNK_TOKENS):
            rows, wanted = hidden[start:start + CHUNK_TOKENS], targets[start:start + CHUNK_TOKENS]
            logits = rows @ weight.T
            counted = wanted != IGNORE_INDEX
            safe = torch.where(counted, wanted, 0)
            total += (torch.logsumexp(logits, -1) - logits.gather(1, safe[:, None])[:, 0])[counted].sum()
            dlogits = torch.softmax(logits, -1)
            dlogits[torch.arange(len(safe)), safe] -= 1
            dlogits *= counted[:, None]
            grad_hidden[start:start + CHUNK_TOKENS] = dlogits @ weight
            if grad_weight is not None:
                grad_weight += dlogits.T @ rows
        ctx.save_for_backward(grad_hidden, grad_weight if grad_weight is not None else weight)
        ctx.has_weight_grad = grad_weight is not None
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple:
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_total, (grad_weight * grad_total if ctx.has_weight_grad else None), None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         num_items_in_batch: Any = None) -> torch.Tensor:
    """transformers' causal-LM loss of ``hidden @ weight.T`` against ``labels``, chunked.

    >>> h, w, y = torch.randn(2, 5, 4), torch.randn(7, 4), torch.randint(0, 7, (2, 5))
    >>> from transformers.loss.loss_utils import ForCausalLMLoss
    >>> torch.allclose(linear_cross_entropy(h, w, y), ForCausalLMLoss(h @ w.T, y, 7), atol=1e-6)
    True
    """
    targets = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)
    total = _ChunkedLinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets)
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
