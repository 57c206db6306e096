"""How long ``fxpeft.rewrite`` of the real SmolLM2-135M takes, first call (cold: the first
capture in a fresh process) and second call (warm: the capture cache), cut to 2, 8 and 30 layers,
with capture-once-and-replicate on and off (``FXPEFT_REPLICATE=0``). Each measure runs in its own
fresh process (medians over ``--repeat`` processes); the model is loaded before the clock
starts.

    python bench/capture_time.py [--layers 2 8 30] [--repeat 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line  # noqa: E402

_CHILD = """
import json, time, torch
import fxpeft
from fxpeft.models import load_smollm2
model, _ = load_smollm2()
layers = {layers}
model.model.layers = model.model.layers[:layers]  # the first layers, as a shallower SmolLM2
model.config.num_hidden_layers = layers
if getattr(model.config, "layer_types", None):
    model.config.layer_types = model.config.layer_types[:layers]
times = []
for _ in range(2):
    start = time.perf_counter()
    fxpeft.rewrite(model, "lora_qv")
    times.append(time.perf_counter() - start)
print(json.dumps(times))
"""


def rewrite_seconds(layers: int, replicate: bool) -> tuple[float, float]:
    """(first call, second call) seconds of ``fxpeft.rewrite`` in a fresh process."""
    env = {**os.environ, "FXPEFT_REPLICATE": "1" if replicate else "0"}
    out = subprocess.run([sys.executable, "-c", _CHILD.format(layers=layers)], env=env,
                         capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    if out.returncode:
        raise SystemExit(f"capture_time {layers} layers failed:\n{out.stderr[-2000:]}")
    first, second = json.loads(out.stdout.strip().splitlines()[-1])
    return first, second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8, 30])
    parser.add_argument("--repeat", type=int, default=3, help="fresh processes per measure (median)")
    parser.add_argument("--json")
    args = parser.parse_args()
    print(machine_line())
    runs: dict[str, list[tuple[float, float]]] = {}
    for _ in range(args.repeat):  # interleaved, so load changes hit every measure alike
        for layers in args.layers:
            for replicate in (True, False):
                label = f"{layers} layers, replication {'on' if replicate else 'off'}"
                runs.setdefault(label, []).append(rewrite_seconds(layers, replicate))
    results = {}
    for label, times in runs.items():
        first, second = (statistics.median(t[i] for t in times) for i in (0, 1))
        print(f"  {label:<28} first call {first:6.2f} s   second call {second:6.3f} s   "
              f"(median of {len(times)}; first calls {', '.join(f'{t[0]:.2f}' for t in times)})")
        results[label] = {"first_s": first, "second_s": second, "runs": times}
    print(machine_line())
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_line(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
