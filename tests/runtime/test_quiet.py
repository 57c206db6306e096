"""Quiet by default (issue 24, item 8): ``rewrite`` and ``explain`` print no warning fxpeft
causes (torch's ``isinstance(treespec, LeafSpec)`` FutureWarning, raised by copying an exported
graph's tree specs), and the user's own warnings still show. pyproject's pytest filterwarnings
and conftest ignore warnings, so each test resets the filters first."""

from __future__ import annotations

import warnings

import torch

import fxpeft
from conftest import tiny_gpt2, tiny_llama


def test_rewrite_and_explain_warn_nothing():
    llama, gpt2 = tiny_llama(), tiny_gpt2()
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        fxpeft.rewrite(llama, "lora_qv.toml")
        fxpeft.explain(gpt2, "lora_all_linear.toml")
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []


class Warns(torch.nn.Module):
    """A model whose forward warns, as a user's code may."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated: the user's own", FutureWarning)
        return self.proj(x)


def test_the_user_s_own_warnings_still_show():
    rule = fxpeft.rules.Rule(where=fxpeft.rules.Where(path=["proj"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        filters = list(warnings.filters)
        gm = fxpeft.rewrite(Warns(), rule, example_inputs=(torch.zeros(2, 4),))
        assert warnings.filters == filters  # no filter left behind
        warnings.warn("after the rewrite", FutureWarning)
    messages = [str(w.message) for w in caught]
    assert "`isinstance(treespec, LeafSpec)` is deprecated: the user's own" in messages, messages
    assert "after the rewrite" in messages
    assert fxpeft.trainable_parameters(gm)[0] > 0
