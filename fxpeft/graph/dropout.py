"""Dropout as data. Exported graphs bake dropout in as constants (``aten.dropout(x, p, train)``,
SDPA's ``dropout_p``), and ``ep.module().train()`` raises. In an emitted graph every dropout
calls one of two shared submodules that read their own ``training`` flag instead.
"""

from __future__ import annotations

import torch

from fxpeft.names import DROPOUT_MODULE

ATTENTION_DROPOUT_MODULE = f"{DROPOUT_MODULE}_attention"
TRAINING_FLAG_MODULE = "fxpeft_training"  # TrainingFlag: the mode, for mode-dependent ops


class Dropout(torch.nn.Module):
    """``dropout(x, p)`` in train mode, ``x`` in eval mode; one instance serves every site.

    >>> d = Dropout().eval(); x = torch.ones(3)
    >>> torch.equal(d(x, 0.5), x)
    True
    """

    def forward(self, x: torch.Tensor, p: float) -> torch.Tensor:
        return torch.nn.functional.dropout(x, p, self.training)


class AttentionDropout(torch.nn.Module):
    """SDPA's ``dropout_p``: ``p`` in train mode, 0 in eval mode.

    >>> AttentionDropout().eval()(0.1)
    0.0
    """

    def forward(self, p: float) -> float:
        return p if self.training else 0.0


class TrainingFlag(torch.nn.Module):
    """The graph's train/eval flag as a value, for ops whose computation depends on the mode
    (bitsandbytes' 8-bit layers: ``fxpeft.capture.quantized.route_8bit_by_mode``).

    >>> TrainingFlag().eval()()
    False
    """

    def forward(self) -> bool:
        return self.training


def dropout_target(gm: torch.nn.Module) -> str:
    """The shared ``Dropout`` submodule of ``gm`` (added on first use), for passes to call."""
    if not hasattr(gm, DROPOUT_MODULE):
        gm.add_module(DROPOUT_MODULE, Dropout().train(gm.training))
    return DROPOUT_MODULE


def training_flag_target(gm: torch.nn.Module) -> str:
    """The shared ``TrainingFlag`` submodule of ``gm`` (added on first use): graph nodes that
    call it follow the graph's mode, not a flag of their own, which a decode graph sharing it
    sets to eval.

    >>> training_flag_target(torch.nn.Module())
    'fxpeft_training'
    """
    if not hasattr(gm, TRAINING_FLAG_MODULE):
        gm.add_module(TRAINING_FLAG_MODULE, TrainingFlag().train(gm.training))
    return TRAINING_FLAG_MODULE
