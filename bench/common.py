"""Benchmark hygiene shared by the bench scripts: interleaved sides, warm-up, medians, and the
machine state (threads, load average) printed beside every ratio."""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

import torch


def machine_line() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_initialized() else ""
    return (f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
            f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}{gpu}")


def synchronize() -> None:
    """Wait for queued GPU work, so a step's time is its own (a no-op on the CPU)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def interleaved_times(sides: dict[str, Callable[[], None]], steps: int, warmup: int) -> dict[str, list[float]]:
    """Run each side once per round, round-robin, so machine noise hits every side alike;
    return each side's seconds per call, one per round after ``warmup`` rounds."""
    times: dict[str, list[float]] = {name: [] for name in sides}
    for round_index in range(warmup + steps):
        for name, step in sides.items():
            synchronize()
            start = time.perf_counter()
            step()
            synchronize()
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                times[name].append(elapsed)
    return times


def interleaved_medians(sides: dict[str, Callable[[], None]], steps: int, warmup: int) -> dict[str, float]:
    """The median of each side's ``interleaved_times``."""
    return {name: statistics.median(values) for name, values in interleaved_times(sides, steps, warmup).items()}


def print_ratios(medians: dict[str, float], reference: str) -> None:
    print(machine_line())
    for name, seconds in medians.items():
        print(f"{name:<28} {seconds * 1000:9.1f} ms/step   {seconds / medians[reference]:6.3f} x {reference}")


# No network on the GPU machine: a Hub look-up (bitsandbytes asks the Hub for a CPU kernel when it
# is imported, on CPUs with AVX512-BF16, if the `kernels` package is installed) fails at once
# offline instead of waiting on connection timeouts.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run_child(command: list[str], env: dict[str, str] | None = None,
              timeout: float = 600) -> tuple[int | None, str, str]:
    """(exit code, or None if it ran past ``timeout`` and was killed; stdout; stderr) of
    ``command`` run offline (``OFFLINE_ENV``). Output goes through files, so a child that fills
    a pipe cannot block and a killed child's last lines are still there to read; the child leads
    a process group of its own, and the whole group is killed on time-out (compile workers and
    any process it started die with it, never holding the GPU after it).

    >>> import sys
    >>> run_child([sys.executable, "-c", "print(2)"])[:2]
    (0, '2\\n')
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True, start_new_session=True,
                                   env={**(os.environ if env is None else env), **OFFLINE_ENV})
        code: int | None = None
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:  # a time-out, or this process ending (``exit_on_sigterm``): the child's group goes too
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        out.seek(0)
        err.seek(0)
        return code, out.read(), err.read()


def exit_on_sigterm() -> None:
    """Turn SIGTERM (``timeout``'s signal) into ``SystemExit``, so ``run_child``'s clean-up
    kills the running child's process group instead of leaving it holding the GPU."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
