"""Where a cold first compiled step spends its time: per side (PEFT, fxpeft, the fused copy),
in a fresh process with an empty inductor cache and an empty fxpeft compile cache, the C++
files inductor wrote, the distinct kernels in them, those shared with the other sides (same
source hash), and the seconds in g++ (builds run in-process: one compile thread, so each is timed).

    python bench/compile_profile.py [--sides peft,fused] [--repeats 1] [run.py's shape flags]

Inductor's precompiled header lives in its global folder (/tmp/torchinductor_$USER), not in the
per-run cache, so it is built once per machine and both sides find it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = """
import json, os, sys, time
sys.path.insert(0, {bench!r})
from torch._inductor import cpp_builder
seconds = []
build = cpp_builder._run_compile_cmd
def timed(cmd_line, cwd):
    start = time.perf_counter(); build(cmd_line, cwd); seconds.append(time.perf_counter() - start)
cpp_builder._run_compile_cmd = timed
import run
args = run.parse({argv!r})
base, ids = run.llama(args), run.batch(args)
rewrite = lambda: run.fxpeft.rewrite(base, "lora_qv", dropout=0.0)
model = {{"peft": lambda: run.peft_lora(base), "fxpeft": rewrite, "fused": lambda: run.fxpeft.fuse(rewrite())}}[{side!r}]()
step = run.training_step(model, ids, compiled=True)
start = time.perf_counter(); step(); total = time.perf_counter() - start
files = [p for p in __import__("pathlib").Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]).rglob("*.cpp")]
print(json.dumps({{"total_s": total, "gxx_s": sum(seconds), "builds": len(seconds),
                  "cpp": sorted(p.name for p in files),
                  "kernels": sum(p.read_text().count('extern "C"') for p in files)}}))
"""


def profile(side: str, argv: list[str]) -> dict:
    """One cold first compiled step of ``side`` in a fresh process."""
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as store:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "FXPEFT_COMPILE_CACHE": store,
               "TORCHINDUCTOR_COMPILE_THREADS": "1"}
        code = _CHILD.format(bench=str(Path(__file__).parent), argv=argv, side=side)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{side} failed:\n{out.stderr[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    argv, sides, repeats = list(sys.argv[1:]), ["peft", "fused"], 1
    for flag in ("--sides", "--repeats"):
        if flag in argv:
            at = argv.index(flag)
            value = argv[at + 1]
            del argv[at:at + 2]
            sides, repeats = (value.split(","), repeats) if flag == "--sides" else (sides, int(value))
    runs = {side: [] for side in sides}
    for _ in range(repeats):  # sides interleaved
        for side in sides:
            runs[side].append(profile(side, argv))
    files = {side: set(runs[side][0]["cpp"]) for side in sides}
    for side, results in runs.items():
        others = set().union(*(files[s] for s in sides if s != side))
        for r in results:
            print(f"{side:<7} cold first step {r['total_s']:6.1f} s, g++ {r['gxx_s']:6.1f} s in {r['builds']} "
                  f"builds ({r['gxx_s'] / r['total_s']:.0%}), {len(r['cpp'])} C++ files, {r['kernels']} kernels, "
                  f"{len(files[side] & others)} files shared with the other sides")


if __name__ == "__main__":
    main()
