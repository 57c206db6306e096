"""bench/fsdp_check.py, the GPU machine's FSDP2 check (bench/gpu.sh's ``fsdp`` section: nccl,
world size 1), run here on the CPU with gloo, in this process, so it is never dead code."""

import importlib.util

from accelerate.state import AcceleratorState

from conftest import REPO_ROOT as ROOT


def _check_module():
    spec = importlib.util.spec_from_file_location("fsdp_check", ROOT / "bench" / "fsdp_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gpu_fsdp_check_runs_on_the_cpu_with_gloo_and_passes(capsys):
    AcceleratorState._reset_state(True)
    try:
        assert _check_module().main(["--device", "cpu", "--backend", "gloo"]) == 0
    finally:
        AcceleratorState._reset_state(True)
    said = capsys.readouterr().out
    assert "device cpu, world size 1, backend gloo, MixedPrecisionPolicy(" in said
    lines = [line.split() for line in said.splitlines() if line.startswith("  model.") or line.startswith("  lm_head")]
    assert len(lines) == 29 and all(line[1] == "DTensor" and line[2] == "cpu" for line in lines)
    assert {line[3] for line in lines if line[-1] == "trainable"} == {"torch.float32"}  # 8 adapters
    assert {line[3] for line in lines if line[-1] == "frozen"} == {"torch.bfloat16"}
    losses = {line.split(": ")[0]: line.split(": ")[1] for line in said.splitlines() if line.startswith("one step")}
    assert len(losses) == 3 and len(set(losses.values())) == 1  # unsharded, shard_layers, accelerate
    assert said.rstrip().endswith("FSDP CHECK: PASS")
