"""``fxpeft.package`` against eager PyTorch running the same graph: the KV-cached decode graph of
a Llama (LoRA q,v, unmerged, adapter switched by input), as an AOTInductor package and as
fxpeft's eager decode graph (``fxpeft.generate``'s).

Printed, from one run: compile time; package size against the graph's tensors; load time and
first-call (prefill) latency, each side in a fresh process (the package's with only torch
imported; the eager side imports transformers and fxpeft, builds the model, rewrites it and
builds its decode graph: what it takes to get a graph that runs); steady per-token latency,
sides interleaved step by step in this process, medians after warm-up.

    python bench/package.py [--threads 2] [--layers 2] [--hidden 256] [--steps 40]

``--threads`` sets ``OMP_NUM_THREADS`` for both sides and the fresh processes, before torch is
imported: the package's kernels are OpenMP loops, which on a busy 2-core machine spin and wait
for each other far more than eager PyTorch's larger ops do (one tiny package's step: 0.6 ms
with 1 thread, 33 ms with 2, at load average 16).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__" and "--threads" in sys.argv:  # before torch reads it
    os.environ["OMP_NUM_THREADS"] = sys.argv[sys.argv.index("--threads") + 1]

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]  # this checkout's fxpeft, whatever is installed
from common import interleaved_medians, machine_line  # noqa: E402

import fxpeft  # noqa: E402
from fxpeft.generation.decode_graph import decoder_for  # noqa: E402

PROMPT, LENGTH = 32, 128

MODEL = """
import torch
from transformers import LlamaConfig, LlamaForCausalLM
def model(layers, hidden):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 4,
        num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
        vocab_size=4096, max_position_embeddings=512)).eval()
"""

# each side in a fresh process: seconds to a runnable graph, then the first (prefill) call
PACKAGED = """
import json, sys, time
start = time.perf_counter()
import torch
imported = time.perf_counter()
run = torch._inductor.aoti_load_package(sys.argv[1])
loaded = time.perf_counter()
ids = torch.arange(%(prompt)d)[None] + 5
mask = torch.zeros(1, %(length)d, dtype=torch.long); mask[:, :%(prompt)d] = 1
steps = torch.arange(%(prompt)d)
run(ids, mask, steps[None], steps, torch.tensor(0))
print(json.dumps({"import": imported - start, "load": loaded - imported, "first": time.perf_counter() - loaded}))
"""

EAGER = """
import time
start = time.perf_counter()
""" + MODEL + """
import json, sys
import fxpeft
from fxpeft.generation.decode_graph import decoder_for
imported = time.perf_counter()
gm = fxpeft.rewrite(model(int(sys.argv[1]), int(sys.argv[2])), "lora_qv.toml").eval()
decoder = decoder_for(gm, 1, %(length)d)
loaded = time.perf_counter()
ids = torch.arange(%(prompt)d)[None] + 5
mask = torch.zeros(1, %(length)d, dtype=torch.long); mask[:, :%(prompt)d] = 1
steps = torch.arange(%(prompt)d)
with torch.no_grad():
    decoder(ids, mask, steps[None], steps)
print(json.dumps({"import": imported - start, "load": loaded - imported, "first": time.perf_counter() - loaded}))
"""


def _fresh(code: str, *args: str) -> dict:
    filled = code % {"prompt": PROMPT, "length": LENGTH}
    done = subprocess.run([sys.executable, "-c", filled, *args], capture_output=True, text=True,
                          check=True, cwd=ROOT)  # -c puts the folder it runs in first on the path
    return json.loads(done.stdout.strip().splitlines()[-1])


def _steps(run, decoder) -> dict:
    """One decoding step of each side, at the same cache position (each side its own cache)."""
    mask = torch.zeros(1, LENGTH, dtype=torch.long)
    mask[:, :PROMPT + 1] = 1
    token, where = torch.tensor([[7]]), torch.tensor([PROMPT])
    adapter = torch.tensor(0)
    return {"package": torch.no_grad()(lambda: run(token, mask, where[None], where, adapter)),
            "eager": torch.no_grad()(lambda: decoder(token, mask, where[None], where))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for both sides")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40)
    options = parser.parse_args()
    namespace: dict = {}
    exec(MODEL, namespace)
    gm = fxpeft.rewrite(namespace["model"](options.layers, options.hidden), "lora_qv.toml").eval()
    folder = Path(tempfile.mkdtemp(prefix="fxpeft-package-"))
    start = time.perf_counter()
    info = fxpeft.package(gm, folder / "decode.pt2", torch.arange(PROMPT)[None] + 5, decode_length=LENGTH)
    compiled = time.perf_counter() - start
    decoder = decoder_for(gm, 1, LENGTH)
    tensors = sum(t.numel() * t.element_size() for t in [*decoder.parameters(), *decoder.buffers()])
    package_side = _fresh(PACKAGED, str(info.path))
    eager_side = _fresh(EAGER, str(options.layers), str(options.hidden))
    run = torch._inductor.aoti_load_package(str(info.path))
    steady = interleaved_medians(_steps(run, decoder), options.steps, warmup=5)
    print(machine_line())
    print(f"Llama hidden {options.hidden}, {options.layers} layers, vocab 4096, LoRA q,v unmerged; "
          f"batch 1, prompt {PROMPT}, KV cache {LENGTH}")
    print(f"compile (fxpeft.package)       {compiled:8.1f} s")
    print(f"package size                   {info.path.stat().st_size / 2**20:8.2f} MiB   "
          f"{info.path.stat().st_size / tensors:6.3f} x the graph's tensors ({tensors / 2**20:.2f} MiB)")
    for what in ("import", "load", "first"):
        label = {"import": "import (torch / torch,transformers,fxpeft)", "load": "load to a runnable graph",
                 "first": "first call (prefill)"}[what]
        print(f"{label:<38} package {package_side[what] * 1000:8.1f} ms   eager {eager_side[what] * 1000:8.1f} ms"
              f"   {package_side[what] / eager_side[what]:6.3f} x eager")
    print(f"{'steady per-token step':<38} package {steady['package'] * 1000:8.2f} ms   eager "
          f"{steady['eager'] * 1000:8.2f} ms   {steady['package'] / steady['eager']:6.3f} x eager")


if __name__ == "__main__":
    main()
