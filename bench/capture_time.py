"""How long ``fxpeft.rewrite`` of the real SmolLM2-135M takes, first call (cold: the first
capture in a fresh process) and second call (warm: the capture cache), cut to 2, 8 and 30 layers,
with capture-once-and-replicate on and off (``FXPEFT_REPLICATE=0``); and then the first and
second ``fxpeft.generate`` of 8 tokens (the first one builds the decode graph), against PEFT's
``get_peft_model`` and ``generate`` in a process of their own. Each measure runs in its own
fresh process (medians over ``--repeat`` processes); the model is loaded before the clock
starts.

``--model gemma3``: a Gemma-3-270M-shaped model instead (hidden 640, 18 layers, Gemma-3's
``layer_types``: 5 sliding-window layers to 1 full-attention one; random weights), whose layers
come in two kinds: ``rewrite`` only (first and second call), replication per kind on and off.

    python bench/capture_time.py [--layers 2 8 30] [--repeat 3] [--json out.json]
    python bench/capture_time.py --model gemma3 --layers 18 --repeat 5
    python bench/capture_time.py --new-process --layers 30 --repeat 5  # import and call, wall and CPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line  # noqa: E402

_LOAD = """
import json, time, torch
from fxpeft.helpers.models import load_smollm2
model, _ = load_smollm2()
layers = {layers}
model.model.layers = model.model.layers[:layers]  # the first layers, as a shallower SmolLM2
model.config.num_hidden_layers = layers
if getattr(model.config, "layer_types", None):
    model.config.layer_types = model.config.layer_types[:layers]
ids = torch.randint(10, 10000, (1, 32), generator=torch.Generator().manual_seed(1))
def timed(run):
    start = time.perf_counter()
    out = run()
    return out, time.perf_counter() - start
"""
_LOAD_GEMMA3 = """
import json, time, torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig
torch.manual_seed(0)
config = Gemma3TextConfig(hidden_size=640, intermediate_size=2048, num_hidden_layers={layers},
                          num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                          vocab_size=262144, sliding_window=512, max_position_embeddings=32768)
model = Gemma3ForCausalLM(config).eval()  # Gemma-3-270M's shape, random weights
def timed(run):
    start = time.perf_counter()
    out = run()
    return out, time.perf_counter() - start
"""
_REWRITE_ONLY = """
import fxpeft
cpu = time.process_time()
gm, first = timed(lambda: fxpeft.rewrite(model, "lora_qv"))
first_cpu = time.process_time() - cpu
_, second = timed(lambda: fxpeft.rewrite(model, "lora_qv"))
print(json.dumps([first, second, float("nan"), float("nan"), first_cpu]))
"""
_FXPEFT = _LOAD + """
import fxpeft
gm, first = timed(lambda: fxpeft.rewrite(model, "lora_qv"))
_, second = timed(lambda: fxpeft.rewrite(model, "lora_qv"))
_, generate_first = timed(lambda: fxpeft.generate(gm, ids, max_new_tokens=8))
_, generate_second = timed(lambda: fxpeft.generate(gm, ids, max_new_tokens=8))
print(json.dumps([first, second, generate_first, generate_second]))
"""
_PEFT = _LOAD + """
from peft import LoraConfig, get_peft_model
peft_model, first = timed(lambda: get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"])))
generate = lambda: peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                       max_new_tokens=8, do_sample=False)
_, generate_first = timed(generate)
_, generate_second = timed(generate)
print(json.dumps([first, float("nan"), generate_first, generate_second]))
"""
MEASURES = ("first call", "second call", "first generate", "second generate", "first call CPU")
# One new process: import times, then the first rewrite's wall and CPU seconds (the model loaded
# before the clock starts, as above).
_NEW_PROCESS = """
import time
start, cpu = time.perf_counter(), time.process_time()
import torch, transformers
from transformers import LlamaForCausalLM
middle, middle_cpu = time.perf_counter(), time.process_time()
import fxpeft
imported, imported_cpu = time.perf_counter(), time.process_time()
""" + _LOAD + """
call, call_cpu = time.perf_counter(), time.process_time()
fxpeft.rewrite(model, "lora_qv")
print(json.dumps({{"import torch + transformers": middle - start, "import fxpeft": imported - middle,
                  "import fxpeft CPU": imported_cpu - middle_cpu, "rewrite": time.perf_counter() - call,
                  "rewrite CPU": time.process_time() - call_cpu}}))
"""


def child_seconds(layers: int, side: str, capture_cache: str | None = None,
                  model: str = "smollm2") -> list[float]:
    """The seconds of ``MEASURES`` in a fresh process: ``side`` is "fxpeft" (replication on),
    "fxpeft whole" (``FXPEFT_REPLICATE=0``) or "PEFT" (its first call is ``get_peft_model``);
    ``model`` "gemma3" measures the two rewrites only (the generate measures are nan), and the
    first call's CPU seconds (``time.process_time``: on a shared machine, wall time counts the
    other processes' share too).
    ``capture_cache`` is the on-disk capture cache folder the process uses (``fxpeft.capture.
    disk_cache``); by default an empty one of its own, so the first call captures cold."""
    with tempfile.TemporaryDirectory() as empty:
        env = {**os.environ, "FXPEFT_REPLICATE": "0" if side == "fxpeft whole" else "1",
               "FXPEFT_CAPTURE_CACHE_DIR": capture_cache or empty}
        return _run_child(layers, side, env, model)


def _run_child(layers: int, side: str, env: dict[str, str], model: str) -> list[float]:
    if model == "gemma3":
        code = (_LOAD_GEMMA3 + _REWRITE_ONLY).format(layers=layers)
    else:
        code = (_PEFT if side == "PEFT" else _FXPEFT).format(layers=layers)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=Path(__file__).parent.parent)
    if out.returncode:
        raise SystemExit(f"capture_time {side}, {layers} layers failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def rewrite_seconds(layers: int, replicate: bool) -> tuple[float, float]:
    """(first call, second call) seconds of ``fxpeft.rewrite`` in a fresh process."""
    first, second, *_ = child_seconds(layers, "fxpeft" if replicate else "fxpeft whole")
    return first, second


def new_process_seconds(layers: int, repeat: int = 3) -> tuple[float, float, float]:
    """Medians over ``repeat`` rounds of (cold: the first ``rewrite`` in a new process with an
    empty capture cache; warm: the first ``rewrite`` in another new process that finds the
    first one's capture on disk; the second call in the warm process)."""
    rounds = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as folder:
            cold = child_seconds(layers, "fxpeft", folder)[0]
            warm, second, *_ = child_seconds(layers, "fxpeft", folder)
        rounds.append((cold, warm, second))
    return tuple(statistics.median(r[i] for r in rounds) for i in range(3))


def new_process_table(layers: int, repeat: int) -> dict[str, dict[str, float]]:
    """Medians over ``repeat`` rounds of a cold process (an empty capture cache) and a warm one
    (the cold one's capture on disk): import seconds, and the first ``rewrite``'s wall and CPU
    seconds. ``--new-process`` prints it."""
    rounds: dict[str, list[dict[str, float]]] = {"cold": [], "warm": []}
    code = _NEW_PROCESS.format(layers=layers)
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as folder:
            env = {**os.environ, "FXPEFT_CAPTURE_CACHE_DIR": folder}
            for case in rounds:
                out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                     text=True, cwd=Path(__file__).parent.parent)
                if out.returncode:
                    raise SystemExit(f"capture_time --new-process failed:\n{out.stderr[-2000:]}")
                rounds[case].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {case: {name: statistics.median(r[name] for r in runs) for name in runs[0]}
            for case, runs in rounds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8, 30])
    parser.add_argument("--repeat", type=int, default=3, help="fresh processes per measure (median)")
    parser.add_argument("--model", choices=("smollm2", "gemma3"), default="smollm2")
    parser.add_argument("--sides", nargs="+", help="fxpeft, 'fxpeft whole', PEFT (default: all the model's)")
    parser.add_argument("--json")
    parser.add_argument("--new-process", action="store_true",
                        help="import and first-rewrite seconds (wall and CPU) of a cold and a warm process")
    args = parser.parse_args()
    print(machine_line())
    if args.new_process:
        for layers in args.layers:
            for case, medians in new_process_table(layers, args.repeat).items():
                print(f"  {layers} layers, {case:<5} " + "   ".join(f"{k} {v:5.2f} s" for k, v in medians.items())
                      + f"   (median of {args.repeat})")
        print(machine_line())
        return
    sides = args.sides or (("fxpeft", "fxpeft whole") if args.model == "gemma3" else ("fxpeft", "fxpeft whole", "PEFT"))
    runs: dict[str, list[list[float]]] = {}
    for _ in range(args.repeat):  # interleaved, so load changes hit every measure alike
        for layers in args.layers:
            for side in sides:
                runs.setdefault(f"{layers} layers, {side}", []).append(child_seconds(layers, side, model=args.model))
    results = {}
    for label, times in runs.items():
        medians = {name: statistics.median(t[i] for t in times) for i, name in enumerate(MEASURES) if i < len(times[0])}
        print(f"  {label:<22} " + "   ".join(f"{name} {seconds:6.2f} s" for name, seconds in medians.items())
              + f"   (median of {len(times)})")
        results[label] = {**medians, "runs": times}
    for layers in args.layers if args.model == "smollm2" and "PEFT" in sides else ():
        ours, theirs = results[f"{layers} layers, fxpeft"], results[f"{layers} layers, PEFT"]
        print(f"  {layers} layers: first generate {ours['first generate'] / theirs['first generate']:.2f} x "
              f"PEFT's; rewrite + first generate {(ours['first call'] + ours['first generate']) / (theirs['first call'] + theirs['first generate']):.2f} x "
              f"get_peft_model + first generate")
    print(machine_line())
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_line(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
