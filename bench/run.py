"""Every speed row of the performance issue in one command: fxpeft against HF PEFT (and the
frozen base) on the same model, sides interleaved step by step, medians after warm-up, ratios
from this run only, with the thread count and load average.

    python bench/run.py [--layers 4 --hidden 576 --vocab 4096 --batch 4 --seq 128 --steps 8]
                        [--rows eager,compiled,adapters,mixed,inference,rewrite,compile_time]
                        [--device cuda] [--json out.json]

Every training row (eager, compiled, cudagraphs, adapters) also prints tokens per second and MFU:
the step's model FLOPs (``bench/flops.py``: forward, input gradients and the adapter's weight
gradients, attention counted in full) over the median step time, over the peak of a large GEMM
of the model's dtype that this script times on the same device at start-up.

Rows:
- eager: one AdamW training step, LoRA q,v (r=8, alpha=16, dropout 0): fxpeft's graph, its fused
  copy (``fxpeft.fuse``), PEFT.
- compiled: the same step under ``torch.compile`` (inductor), each side warmed up first.
- cudagraphs (GPU): the same step under ``torch.compile(mode="reduce-overhead")``, which
  records CUDA graphs where the compiled graph has no break.
- adapters: 4 adapters loaded, 1 active, against a graph holding only that adapter (gated
  graph and fused copy).
- mixed: inference with ``adapter_names=`` over 8 adapters, batch 16 x seq, a different mixture
  each step, against PEFT's mixed batch and a graph holding one adapter; eager, and compiled
  (``torch.compile`` of ``fuse(gm, mixed=True)``: one compile for every mixture).
- inference: unmerged and merged forward, against the base model.
- rewrite: ``fxpeft.rewrite`` of the real SmolLM2-135M, first call (in a fresh process) and
  second call, against ``get_peft_model`` (``bench/capture_time.py`` has more depths).
- compile_time: the first compiled step, each side (fxpeft, fused, fused with
  ``regions="layers"``, PEFT) in a fresh process with empty inductor and fxpeft compile caches
  (cold); in another with an empty inductor cache and the compile cache fxpeft kept from the
  cold one (warm start; PEFT keeps none); and in a third on the inductor cache the cold one
  filled (warm); ``--compile-repeats`` times (default 2), sides interleaved; medians (slow).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved_medians, machine_line, synchronize  # noqa: E402, F401 (synchronize: the compile child)
from flops import DecoderShape, gemm_size, lora_step_flops, measured_peak_flops, mfu  # noqa: E402

import fxpeft  # noqa: E402

ROWS = ("eager", "compiled", "cudagraphs", "adapters", "mixed", "inference", "rewrite", "compile_time")
TRAINING_ROWS = {"eager", "compiled", "cudagraphs", "adapters"}  # these print tokens/s and MFU


def llama(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=9, num_key_value_heads=3,
                         vocab_size=args.vocab, max_position_embeddings=2048)
    return LlamaForCausalLM(config).eval().to(args.device)


def peft_lora(model: torch.nn.Module, names: tuple[str, ...] = ("default",)) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    peft_model = get_peft_model(model, config, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, config)
    return peft_model


def training_step(model: torch.nn.Module, ids: torch.Tensor, compiled: bool = False,
                  mode: str | None = None):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    forward = torch.compile(model, mode=mode) if compiled else model

    def step() -> None:
        loss = forward(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def inference_step(model: torch.nn.Module, ids: torch.Tensor, **kwargs):
    model.eval()

    def step() -> None:
        with torch.no_grad():
            model(input_ids=ids, **kwargs)
    return step


def report(title: str, medians: dict[str, float], reference: str, results: dict,
           step: "StepMeasure | None" = None) -> None:
    """Print and record each side's median and its ratio to ``reference``; for a training row
    (``step`` given) also tokens per second and MFU."""
    print(f"\n{title}")
    for name, seconds in medians.items():
        extra = f"   {step.tokens / seconds:9.0f} tokens/s   MFU {step.mfu(seconds):6.2%}" if step else ""
        print(f"  {name:<34} {seconds * 1000:9.1f} ms   {seconds / medians[reference]:6.3f} x {reference}{extra}")
    results[title] = {name: {"ms": s * 1000, "ratio": s / medians[reference],
                             **({"tokens_per_s": step.tokens / s, "mfu": step.mfu(s)} if step else {})}
                      for name, s in medians.items()}


class StepMeasure:
    """A LoRA q,v training step's tokens and model FLOPs (``bench/flops.py``: forward, input
    gradients, the adapter's weight gradients, attention in full) and the peak they are divided
    by: a large GEMM of the model's dtype on its device, timed once per run by this script."""

    def __init__(self, args: argparse.Namespace, base: torch.nn.Module) -> None:
        self.tokens = args.batch * args.seq
        self.flops = lora_step_flops(DecoderShape.of(base.config), args.batch, args.seq).total
        weight = next(base.parameters())
        self.peak = measured_peak_flops(weight.device, weight.dtype)
        print(f"step model FLOPs {self.flops / 1e9:.2f} G; measured peak ({weight.dtype} GEMM "
              f"{gemm_size(weight.device)}^3 on {weight.device}) {self.peak / 1e9:.1f} GFLOP/s")

    def mfu(self, seconds: float) -> float:
        return mfu(self.flops, seconds, self.peak)


def row_eager(args, base, ids, results, step: StepMeasure) -> None:
    gm = fxpeft.rewrite(copy.deepcopy(base), "lora_qv", dropout=0.0)
    sides = {"fxpeft": training_step(gm, ids), "fxpeft fused": training_step(fxpeft.fuse(gm), ids),
             "PEFT": training_step(peft_lora(copy.deepcopy(base)), ids)}
    report("eager training step (LoRA q,v)", interleaved_medians(sides, args.steps, 2), "PEFT", results, step)


def row_compiled(args, base, ids, results, step: StepMeasure) -> None:
    torch._dynamo.reset()
    gm = fxpeft.rewrite(copy.deepcopy(base), "lora_qv", dropout=0.0)
    sides = {"fxpeft compiled": training_step(gm, ids, True),
             "fxpeft fused compiled": training_step(fxpeft.fuse(gm), ids, True),
             "PEFT compiled": training_step(peft_lora(copy.deepcopy(base)), ids, True)}
    report("compiled training step", interleaved_medians(sides, args.steps, 3), "PEFT compiled", results, step)


def row_cudagraphs(args, base, ids, results, step: StepMeasure) -> None:
    if base.device.type != "cuda":
        print("\ncudagraphs: skipped (a GPU row; run with --device cuda)")
        return
    torch._dynamo.reset()
    gm = fxpeft.rewrite(copy.deepcopy(base), "lora_qv", dropout=0.0)
    mode = "reduce-overhead"
    sides = {"fxpeft fused, reduce-overhead": training_step(fxpeft.fuse(gm), ids, True, mode),
             "PEFT, reduce-overhead": training_step(peft_lora(copy.deepcopy(base)), ids, True, mode),
             "PEFT compiled (default mode)": training_step(peft_lora(copy.deepcopy(base)), ids, True)}
    report("compiled training step, CUDA graphs (mode='reduce-overhead')",
           interleaved_medians(sides, args.steps, 3), "PEFT, reduce-overhead", results, step)


def row_adapters(args, base, ids, results, step: StepMeasure) -> None:
    one = fxpeft.rewrite(copy.deepcopy(base), "lora_qv", dropout=0.0)
    four = fxpeft.rewrite(copy.deepcopy(base), "lora_qv", dropout=0.0)
    for name in ("b", "c", "d"):
        four.add_adapter(name, "lora_qv", dropout=0.0)
    four.set_adapter("default")
    sides = {"fxpeft 1 adapter": training_step(one, ids), "fxpeft 4 loaded, 1 active": training_step(four, ids),
             "fxpeft fused, 4 loaded": training_step(fxpeft.fuse(four), ids),
             "PEFT 4 loaded, 1 active": training_step(peft_lora(copy.deepcopy(base), ("default", "b", "c", "d")), ids)}
    report("training step, 4 adapters loaded, 1 active", interleaved_medians(sides, args.steps, 2),
           "fxpeft 1 adapter", results, step)  # model FLOPs: the one active adapter's


def _mixtures(names: list[str], batch: int, count: int = 5) -> list[list[str]]:
    """``count`` different per-sample mixtures, each adapter on ``batch / len(names)`` samples
    (the same work for every mixture, so steps are comparable)."""
    generator = torch.Generator().manual_seed(2)
    rows = [names[i % len(names)] for i in range(batch)]
    return [[rows[i] for i in torch.randperm(batch, generator=generator)] for _ in range(count)]


def mixed_step(model: torch.nn.Module, ids: torch.Tensor, mixtures: list[list[str]]):
    """Inference with ``adapter_names=``, a different mixture each call (as serving sees)."""
    steps = [inference_step(model, ids, adapter_names=names) for names in mixtures]
    calls = iter(range(10 ** 9))
    return lambda: steps[next(calls) % len(steps)]()


def row_mixed(args, base, results) -> None:
    names = [f"a{i}" for i in range(8)]
    ids = torch.randint(0, args.vocab, (16, args.seq), generator=torch.Generator().manual_seed(1))
    ids = ids.to(args.device)
    mixtures = _mixtures(names, 16)
    gm = fxpeft.rewrite(copy.deepcopy(base), "lora_qv", dropout=0.0, adapter=names[0])
    for name in names[1:]:
        gm.add_adapter(name, "lora_qv", dropout=0.0)
    one = fxpeft.rewrite(copy.deepcopy(base), "lora_qv", dropout=0.0)
    fused = fxpeft.fuse(gm.eval(), mixed=True)
    peft_model = peft_lora(copy.deepcopy(base), tuple(names))
    torch._dynamo.reset()
    sides = {"fxpeft mixed": mixed_step(gm, ids, mixtures),
             "fxpeft fused mixed": mixed_step(fused, ids, mixtures),
             "fxpeft one adapter": inference_step(one, ids),
             "PEFT mixed": mixed_step(peft_model, ids, mixtures),
             "fxpeft fused mixed, compiled": mixed_step(torch.compile(fused), ids, mixtures),
             "fxpeft one adapter, compiled": inference_step(torch.compile(fxpeft.fuse(one)), ids)}
    report("mixed-batch inference, 8 LoRA adapters, batch 16 (a new mixture each step; PEFT "
           "eager: compiled, it recompiles per mixture)", interleaved_medians(sides, args.steps, 2),
           "PEFT mixed", results)


def row_inference(args, base, ids, results) -> None:
    gm = fxpeft.rewrite(copy.deepcopy(base), "lora_qv", dropout=0.0)
    sides = {"fxpeft unmerged": inference_step(gm, ids), "fxpeft fused": inference_step(fxpeft.fuse(gm), ids),
             "fxpeft merged": inference_step(fxpeft.merge(gm), ids),
             "PEFT unmerged": inference_step(peft_lora(copy.deepcopy(base)), ids),
             "base": inference_step(copy.deepcopy(base), ids)}
    report("inference forward", interleaved_medians(sides, args.steps, 2), "base", results)


def row_rewrite(results) -> None:
    """``fxpeft.rewrite`` of the real SmolLM2-135M (30 layers), each the first call in a new
    process: cold (an empty capture cache) and warm (the on-disk capture cache holds the graph a
    previous process captured); and the second call in the same process (the in-process cache),
    against ``get_peft_model`` of it with a deepcopy. Medians of 3 rounds."""
    from capture_time import new_process_seconds
    from fxpeft.helpers.models import load_smollm2
    cold, warm, second = new_process_seconds(30)
    model = load_smollm2()[0]
    start = time.perf_counter()
    peft_lora(copy.deepcopy(model))
    timings = {"fxpeft.rewrite, new process, cold": cold,
               "fxpeft.rewrite, new process, capture cache on disk": warm,
               "fxpeft.rewrite, second call": second,
               "get_peft_model incl. deepcopy": time.perf_counter() - start}
    report("set-up time, real SmolLM2 (30 layers)", timings, "get_peft_model incl. deepcopy", results)


_COMPILE_CHILD = """
import sys, time, torch
sys.path.insert(0, {bench!r})
import run
args = run.parse([{argv}])
base, ids = run.llama(args), run.batch(args)
model = {build}
step = run.training_step(model, ids, compiled=True)
start = time.perf_counter(); step()
run.synchronize()
print(time.perf_counter() - start)
"""


def _first_compiled_step(args, build: str, cache: str, store: str) -> float:
    """Seconds of the first compiled step, in a fresh process whose inductor cache (FX graph and
    AOTAutograd caches live in it) is the folder ``cache`` and fxpeft's warm-start cache
    (``fxpeft.runtime.compile_cache``) the folder ``store``."""
    argv = ", ".join(repr(a) for name in ("layers", "hidden", "vocab", "batch", "seq", "device")
                     for a in (f"--{name}", str(getattr(args, name))))
    code = _COMPILE_CHILD.format(bench=str(Path(__file__).parent), argv=argv, build=build)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "FXPEFT_COMPILE_CACHE": store}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"compile_time {build} failed:\n{out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


COMPILE_CONDITIONS = {
    "cold": "empty inductor cache, empty fxpeft compile cache",
    "warm start": "empty inductor cache, fxpeft's compile cache kept by the cold run",
    "warm": "the inductor cache the cold run filled"}


def row_compile_time(args, results) -> None:
    """Cold: a fresh process with an empty inductor cache and an empty fxpeft compile cache.
    Warm start: another fresh process with an empty inductor cache, on the compile cache fxpeft
    kept from the cold one (PEFT has none: for it this is a second cold run). Warm: a fresh
    process on the inductor cache the cold one filled, as a second run on the same machine finds it."""
    rewrite = "run.fxpeft.rewrite(base, 'lora_qv', dropout=0.0)"
    builds = {"fxpeft": rewrite, "fxpeft fused": f"run.fxpeft.fuse({rewrite})",
              "fxpeft fused, regions='layers'": f"run.fxpeft.fuse({rewrite}, regions='layers')",
              "PEFT": "run.peft_lora(base)"}
    runs = {kind: {name: [] for name in builds} for kind in COMPILE_CONDITIONS}
    for _ in range(args.compile_repeats):  # sides interleaved: A B C, A B C
        for name, build in builds.items():
            with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as store, \
                    tempfile.TemporaryDirectory() as empty:
                runs["cold"][name].append(_first_compiled_step(args, build, cache, store))
                runs["warm start"][name].append(_first_compiled_step(args, build, empty, store))
                runs["warm"][name].append(_first_compiled_step(args, build, cache, store))
    for kind, timings in runs.items():
        for name, seconds in timings.items():
            print(f"  {kind} {name}: " + ", ".join(f"{s:.1f} s" for s in seconds))
        medians = {name: statistics.median(seconds) for name, seconds in timings.items()}
        report(f"first compiled step, {kind} (fresh process, {COMPILE_CONDITIONS[kind]}; median of "
               f"{args.compile_repeats})", medians, "PEFT", results)


def batch(args: argparse.Namespace) -> torch.Tensor:
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    return ids.to(args.device)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("layers", 4), ("hidden", 576), ("vocab", 4096), ("batch", 4), ("seq", 128),
                          ("steps", 8)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--compile-repeats", type=int, default=2,
                        help="fresh processes per side for compile_time")
    parser.add_argument("--rows", default=",".join(r for r in ROWS if r != "compile_time"))
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the GPU rows")
    parser.add_argument("--json", default=None)
    return parser.parse_args(argv)


def main() -> None:
    args = parse()
    rows = args.rows.split(",")
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; rows: {', '.join(ROWS)}")
    base, ids, results = llama(args), batch(args), {}
    print(f"Llama: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, batch {args.batch} x "
          f"{args.seq}\n{machine_line()}")
    training = TRAINING_ROWS & set(rows)
    step = StepMeasure(args, base) if training else None
    runners = {"eager": lambda: row_eager(args, base, ids, results, step),
               "compiled": lambda: row_compiled(args, base, ids, results, step),
               "cudagraphs": lambda: row_cudagraphs(args, base, ids, results, step),
               "adapters": lambda: row_adapters(args, base, ids, results, step),
               "mixed": lambda: row_mixed(args, base, results),
               "inference": lambda: row_inference(args, base, ids, results),
               "rewrite": lambda: row_rewrite(results),
               "compile_time": lambda: row_compile_time(args, results)}
    for row in rows:
        runners[row]()
    print(f"\n{machine_line()}")
    if args.json:
        mfu_basis = {"step_flops": step.flops, "peak_flops": step.peak} if step else {}
        Path(args.json).write_text(json.dumps({"machine": machine_line(), "args": vars(args),
                                               **mfu_basis, "results": results}, indent=2))


if __name__ == "__main__":
    main()
