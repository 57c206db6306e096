"""Benchmark hygiene shared by the bench scripts: interleaved sides, warm-up, medians, and the
machine state (threads, load average) printed beside every ratio."""

from __future__ import annotations

import os
import statistics
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
