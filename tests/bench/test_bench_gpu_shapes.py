"""bench/gpu_shapes.py, the GPU benchmark at realistic shapes, run here at tiny shapes on the CPU
so its code path (every section, the table, the targets) is exercised without a GPU."""

import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))
import gpu_shapes  # noqa: E402
from common import run_child  # noqa: E402


def test_every_section_runs_tiny_on_the_cpu_with_its_table_and_targets(tmp_path, capsys):
    """All sides that can run here do (the compiled ones with the aot_eager backend, no C++
    build); Liger and nf4 skip saying why; the JSON accumulates over two calls (the second with
    the eager sides only, to stay fast)."""
    out = tmp_path / "shapes.json"
    common = ["--tiny", "--in-process", "--steps", "1", "--warmup", "1", "--compile-backend", "aot_eager",
              "--dtype", "float32", "--json", str(out)]
    gpu_shapes.main(["--sections", "lora,qlora", *common])
    report = gpu_shapes.main(["--sections", "context,dora,smollm2", "--context-limit", "128",
                              "--sides", "PEFT eager,fxpeft", *common])
    assert json.loads(out.read_text()).keys() >= {"lora", "qlora", "context", "dora", "smollm2"}
    lora = report["lora"]["sides"]
    for side in ("PEFT eager", "PEFT + compile", "fxpeft", "fxpeft fused + compiled"):
        assert lora[side]["step_s"] > 0 and 0 < lora[side]["mfu"] < 1, (side, lora[side])
        assert lora[side]["last_loss"] == pytest.approx(lora[side]["first_loss"], abs=1.0)
    assert "CUDA only" in lora["PEFT + Liger"]["skipped"]
    qlora = report["qlora"]["sides"]
    assert all("GPU row" in qlora[side]["skipped"] for side in ("PEFT eager", "fxpeft", "fxpeft fused + compiled"))
    assert report["dora"]["step_flops"] > report["lora"]["step_flops"]
    context = report["context"]["sides"]
    assert context["PEFT eager"]["longest"] == context["fxpeft"]["longest"] == 128  # no cap on the CPU
    printed = capsys.readouterr().out
    assert "x PEFT eager" in printed and "x best PEFT+" in printed
    assert "fused + compiled step / PEFT eager: " in printed and "(target <= 0.75): m" in printed


def test_the_context_search_doubles_then_bisects_to_the_granularity():
    tried = []

    def fits(length):
        tried.append(length)
        return length <= 20000
    assert gpu_shapes.longest_fitting(fits, 4096, 131072, 1024) == (19456, 20480)
    assert tried[:4] == [4096, 8192, 16384, 32768]


def test_targets_say_met_or_missed_by_how_much():
    sides = {"PEFT eager": {"step_s": 1.0, "peak_gib": 10.0}, "PEFT + compile": {"step_s": 0.8},
             "PEFT + Liger": {"step_s": 0.9}, "fxpeft fused + compiled": {"step_s": 0.7, "peak_gib": 7.0}}
    lines = "\n".join(gpu_shapes.check_targets({"lora": {"sides": sides}}))
    assert "PEFT eager: 0.700 (target <= 0.75): met" in lines
    assert "PEFT + Liger: 0.875 (target <= 0.9): met" in lines
    assert "PEFT eager's: 0.700 (target <= 0.6): missed by 0.100" in lines
    assert "longest context / PEFT eager's: not measured" in lines


def test_a_side_in_its_own_process_that_hangs_is_killed_with_its_process_group(tmp_path):
    """The parent's limit kills the child and what it started (the stall guard of memory.py and
    gpu_shapes.py)."""
    marker = tmp_path / "grandchild.pid"
    code = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
            f"time.sleep(600)']); open({str(marker)!r}, 'w').write(str(p.pid)); print('started', flush=True); "
            f"time.sleep(600)")
    # a limit no loaded machine's start-up reaches, far below the children's sleep
    exit_code, stdout, _ = run_child([sys.executable, "-c", code], timeout=30)
    assert exit_code is None and "started" in stdout
    status = Path(f"/proc/{int(marker.read_text())}/status")
    assert _ends_within(status, 20), status.read_text()


def _ends_within(status: Path, seconds: float) -> bool:
    """Whether the process of ``status`` is gone (or a zombie) within ``seconds``: a SIGKILL
    takes effect when the process next runs, which on a loaded machine is not at once."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if "zombie" in status.read_text():
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False
