"""examples/llama_adapter_smollm2.py on the real SmolLM2: instructions from Hamlet, a few
LLaMA-Adapter steps, greedy answers before and after, the adapter and its loss curve saved."""

import subprocess
import sys

import pytest

from conftest import REPO_ROOT

pytestmark = pytest.mark.real


def test_example_trains_and_answers(tmp_path):
    script = REPO_ROOT / "examples" / "llama_adapter_smollm2.py"
    result = subprocess.run([sys.executable, str(script), "--steps", "2", "--batch-size", "2",
                             "--eval-blocks", "2", "--show", "1",
                             "--output", str(tmp_path / "adapter")],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("'Who speaks next?' exact match") == 2
    assert "[before]" in result.stdout and "[after]" in result.stdout
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "adapter-loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
