"""DistributedDataParallel over an adapted graph: ``torchrun --nproc_per_node=2`` on
``examples/ddp_smollm2.py --tiny`` (gloo on the CPU) against the same script in one process."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO_ROOT

ROOT = REPO_ROOT  # the checkout, for examples/ and tests/ (the torchrun jobs)
EXAMPLE = ROOT / "examples" / "ddp_smollm2.py"
FLAGS = ["--tiny", "--steps", "8", "--batch-size", "8", "--seq-len", "16", "--lr", "1e-2",
         "--eval-blocks", "4"]
TIMEOUT = 300  # seconds; the run takes about 20 s on 2 busy cores


def _example():
    spec = importlib.util.spec_from_file_location("ddp_smollm2", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torchrun(script: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``script`` on 2 processes. --standalone: the rendezvous binds port 0, so the OS picks a
    free port (no race, no clash with other test runs); a timeout bounds a hung process group."""
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(script), *args]
    done = subprocess.run(command, env={**os.environ, "PYTHONPATH": path}, capture_output=True,
                          text=True, timeout=TIMEOUT, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(the 2-process report, its saved adapter, the 1-process report, its saved adapter)."""
    out = tmp_path_factory.mktemp("ddp")
    done = torchrun(EXAMPLE, *FLAGS, "--output", str(out / "two"), "--report", str(out / "two.json"),
                    cwd=out)
    assert "DDP all-reduces 8 tensors: the 8 adapter tensors" in done.stdout
    one = _example().main([*FLAGS, "--output", str(out / "one")])  # RANK unset: one process
    return (json.loads((out / "two.json").read_text()), load_file(out / "two" / "adapter_model.safetensors"),
            one, load_file(out / "one" / "adapter_model.safetensors"))


def test_only_adapter_gradients_are_all_reduced(runs):
    ddp = runs[0]["ddp"]
    assert runs[0]["world_size"] == 2
    # LoRA A and B on q and v in 2 layers: 8 of the graph's 29 parameter tensors; DDP's reducer
    # holds exactly those, in buckets that add up to their bytes (fp32).
    assert (ddp["reduced_tensors"], ddp["adapter_tensors"], ddp["all_tensors"]) == (8, 8, 29)
    assert ddp["reduced_bytes"] == ddp["adapter_bytes"] == sum(ddp["bucket_sizes"]) == 3584 * 4


def test_both_ranks_end_with_identical_adapters(runs):
    digests = runs[0]["adapter_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]  # bit for bit: all-reduce gives both the same sum


def test_two_processes_equal_one_process_with_the_global_batch(runs):
    two, two_weights, one, one_weights = runs
    assert one["world_size"] == 1 and sorted(two_weights) == sorted(one_weights)
    # Two half-batch means averaged vs one mean over the batch, and 1 vs 2 threads per process:
    # only float summation order differs, which AdamW (dividing by the gradient's running RMS)
    # carries into the weights. Measured on weights up to 0.18: 2.1e-6 at most (losses: 1e-7
    # relative); the tolerances leave 10x (100x) room for other CPUs' kernels.
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]),
                               rtol=1e-5, atol=0)
    for key, tensor in one_weights.items():
        torch.testing.assert_close(two_weights[key], tensor, rtol=0, atol=2e-5, msg=key)
    assert one_weights[key].abs().max() > 1e-2  # trained: B moved away from its zero init


def test_fxpeft_trainer_under_torchrun_checkpoints_once_and_resumes(tmp_path):
    torchrun(ROOT / "tests" / "ddp_trainer_job.py", str(tmp_path), cwd=tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # DDP: both ranks hold the same adapter, trained and resumed
    assert ranks[0]["wrapped"] == "DistributedDataParallel"
    assert ranks[0]["resumed"] == ranks[0]["trained"]  # resumed at step 2: the same step-4 adapter
    assert set(os.listdir(tmp_path / "checkpoint-2")) == {
        "adapter_config.json", "adapter_model.safetensors", "fxpeft_rules.toml", "optimizer.pt",
        "scheduler.pt", "rng_state_0.pth", "rng_state_1.pth", "trainer_state.json",
        "training_args.bin"}  # the adapter, written once (rank 0); no base weights
