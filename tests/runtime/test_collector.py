"""``rewrite``, ``explain`` and the decode graph's build run with Python's cyclic garbage
collector paused (its full collections cost 0.27 s of SmolLM2's 2.0 s first ``rewrite``), and
leave it as they found it: on, off, or after an error."""

from __future__ import annotations

import gc

import pytest
import torch

import fxpeft
from fxpeft.generation import decode_graph
from conftest import tiny_llama, token_batch


class SeesCollector(torch.nn.Module):
    """A plain module whose forward (run by capture's tracer) records whether gc was on."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = torch.nn.Linear(4, 4)
        self.seen: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(gc.isenabled())
        return self.q_proj(x)


@pytest.fixture
def collector_on():
    was = gc.isenabled()
    gc.enable()
    yield
    gc.enable() if was else gc.disable()


def test_capture_runs_paused_and_the_collector_comes_back(collector_on):
    model = SeesCollector()
    gm = fxpeft.rewrite(model, "lora_qv.toml")
    fxpeft.explain(model, "lora_qv.toml")
    assert model.seen == [False, False] and gc.isenabled()
    assert gm.graph.lint() is None


def test_a_collector_the_caller_turned_off_stays_off(collector_on):
    gc.disable()
    fxpeft.rewrite(SeesCollector(), "lora_qv.toml")
    assert not gc.isenabled()


def test_the_collector_comes_back_after_an_error(collector_on):
    with pytest.raises(fxpeft.MatchError):  # no q_proj / v_proj to adapt
        fxpeft.rewrite(torch.nn.Sequential(torch.nn.ReLU()), "lora_qv.toml")
    assert gc.isenabled()


def test_the_decode_graph_builds_paused(collector_on, monkeypatch):
    seen = []
    build = decode_graph._build
    monkeypatch.setattr(decode_graph, "_build", lambda *args: seen.append(gc.isenabled()) or build(*args))
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv.toml").eval()
    fxpeft.generate(gm, token_batch(batch=1, seq=4), max_new_tokens=2)
    assert seen == [False] and gc.isenabled()
