"""What the LyCORIS kinds (LoHa, LoKr) share: PEFT's training-time randomness on an update
weight ``ΔW``, as data that follows ``gm.train()`` / ``gm.eval()`` (as ``fxpeft.graph.dropout``
does for plain dropout). Not a kind: it registers nothing.
"""

from __future__ import annotations

import torch

from fxpeft.names import DROPOUT_MODULE

LYCORIS_DROPOUT = f"{DROPOUT_MODULE}_lycoris"  # the shared LycorisDropout submodule of a graph


class LycorisDropout(torch.nn.Module):
    """LyCORIS' training-time dropouts on a delta weight, in train mode only: each row (output
    feature) is kept with probability ``1 - rank_p`` (kept rows rescaled by ``1 / mean`` with
    ``rescale``), and the whole weight with probability ``1 - module_p``. One instance serves
    every site of a graph; ``gm.train()`` / ``gm.eval()`` switch it.

    >>> drop = LycorisDropout().eval(); w = torch.ones(4, 3)
    >>> torch.equal(drop(w, 0.5, True, 0.5), w)
    True
    """

    def forward(self, weight: torch.Tensor, rank_p: float, rescale: bool, module_p: float) -> torch.Tensor:
        if not self.training:
            return weight
        # PEFT's draws, from the CPU generator, in its order: the module's keep, then the rows'
        # (no branch on the first, so a dropped module still draws the second: compiled graphs
        # stay whole)
        keep = (torch.rand(1) > module_p).to(weight.device, weight.dtype)
        if rank_p > 0:
            rows = (torch.rand(weight.shape[0]) > rank_p).to(weight.device, weight.dtype)
            if rescale:
                rows = rows / rows.mean()
            weight = weight * rows.reshape(-1, *[1] * (weight.dim() - 1))
        return weight * keep


def dropout_target(gm: torch.nn.Module) -> str:
    """The graph's shared ``LycorisDropout`` (added on first use, in the graph's mode), for a
    splice to call: ``graph.call_module(dropout_target(gm), (delta, rank_p, rescale, module_p))``."""
    if not hasattr(gm, LYCORIS_DROPOUT):
        gm.add_module(LYCORIS_DROPOUT, LycorisDropout().train(gm.training))
    return LYCORIS_DROPOUT
