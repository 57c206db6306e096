"""Where a training step's time goes: ``torch.profiler`` over a few eager steps of PEFT,
fxpeft and its fused copy on the model of ``bench/run.py``, the top operators by self time for
each side (CPU time, or CUDA time with ``--device cuda``), so ratios from ``run.py`` can be
explained by operator rather than guessed.

    python bench/profile_step.py [--device cuda] [--top 12] [--steps 4] [run.py's model options]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
import run  # noqa: E402
from common import machine_line, synchronize  # noqa: E402

import fxpeft  # noqa: E402


def top_operators(step, steps: int, cuda: bool, top: int) -> tuple[float, list[tuple[str, float, int]]]:
    """(milliseconds per step over all operators, [(operator, ms per step, calls per step)])."""
    for _ in range(2):  # warm-up
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize()
    events = prof.key_averages()
    self_time = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    total = sum(self_time(e) for e in events) / steps / 1000
    ranked = sorted(events, key=self_time, reverse=True)[:top]
    return total, [(e.key, self_time(e) / steps / 1000, e.count // steps) for e in ranked]


def main() -> None:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--top", type=int, default=12)
    options, rest = extra.parse_known_args()
    args = run.parse(rest)
    base, ids = run.llama(args), run.batch(args)
    gm = fxpeft.rewrite(copy.deepcopy(base), "lora_qv", dropout=0.0)
    sides = {"PEFT": run.training_step(run.peft_lora(copy.deepcopy(base)), ids),
             "fxpeft": run.training_step(gm, ids),
             "fxpeft fused": run.training_step(fxpeft.fuse(gm), ids)}
    cuda = args.device.startswith("cuda")
    print(f"Llama: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, batch {args.batch} x "
          f"{args.seq}, {'CUDA' if cuda else 'CPU'} self time per eager training step\n{machine_line()}")
    for name, step in sides.items():
        total, ranked = top_operators(step, args.steps, cuda, options.top)
        print(f"\n{name}: {total:.1f} ms per step")
        for key, ms, calls in ranked:
            print(f"  {key[:60]:<60} {ms:8.2f} ms  {ms / total:6.1%}  x{calls}")


if __name__ == "__main__":
    main()
