"""Training at realistic shapes on a GPU, against HF PEFT eager, PEFT + torch.compile and PEFT +
Liger Kernel: step time, tokens/s, MFU, peak memory, and the longest sequence that fits a memory
budget. Every side runs in a process of its own (fresh allocator counters; Liger patches
transformers' classes process-wide; an OOM or a hang costs only that side).

    python bench/gpu_shapes.py --sections lora [--steps 10] [--json out.json]
    python bench/gpu_shapes.py --sections context [--budget-gib 40]
    python bench/gpu_shapes.py --sections qlora,dora,smollm2
    python bench/gpu_shapes.py --tiny --in-process        # the same code on the CPU, tiny shapes

Sections (in priority order):
- lora: LoRA r16 (alpha 32, dropout 0) on every linear but the head, Llama-3.2-1B's architecture
  with random weights, bf16, batch 4 x 2048; every side.
- context: the longest sequence at batch 1 whose training step fits in ``--budget-gib`` (the
  allocator capped with ``torch.cuda.set_per_process_memory_fraction``), by doubling, then
  bisecting, with the OOM caught; every side.
- qlora: the same LoRA on an nf4 base (bitsandbytes, bf16 compute, double quantization).
- dora: the same with ``use_dora=True``.
- smollm2: LoRA on SmolLM2-135M's architecture (``bench/smollm2_config.json``), batch 8 x 1024.

Sides: ``PEFT eager``, ``PEFT + compile``, ``PEFT + Liger`` (``apply_liger_kernel_to_llama``:
RMSNorm, SwiGLU, RoPE and the fused linear cross-entropy), ``fxpeft`` (``fxpeft.rewrite`` with
the same ``LoraConfig``), ``fxpeft fused + compiled`` (``torch.compile(fxpeft.fuse(gm))``). A
side that cannot run here (Liger needs CUDA and triton; nf4 needs bitsandbytes' GPU build for
speed) is skipped with its reason. MFU: ``bench/flops.py``'s model FLOPs of the step over the
median step time, over a bf16 GEMM timed by this script on the same device. The JSON file
accumulates across calls (one key per section), so two runs give one report; the table prints
ratios against PEFT eager and against the better of PEFT + compile and PEFT + Liger, and checks
issue 29's targets.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import exit_on_sigterm, machine_line, run_child, synchronize  # noqa: E402
from flops import ALL_LINEAR, DecoderShape, lora_step_flops, measured_peak_flops, mfu  # noqa: E402

SIDES = ("PEFT eager", "PEFT + compile", "PEFT + Liger", "fxpeft", "fxpeft fused + compiled")
SECTIONS = ("lora", "context", "qlora", "dora", "smollm2")
COMPETITORS = ("PEFT + compile", "PEFT + Liger")
TARGET_SIDE = "fxpeft fused + compiled"
GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    config: dict
    batch: int
    seq: int


LLAMA_1B = Shape("Llama-3.2-1B", dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                                      num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
                                      head_dim=64, tie_word_embeddings=True, max_position_embeddings=131072,
                                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
                 batch=4, seq=2048)
TINY = Shape("tiny Llama", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=128, vocab_size=256, max_position_embeddings=512),
             batch=2, seq=32)


def smollm2_shape(tiny: bool) -> Shape:
    if tiny:
        return dataclasses.replace(TINY, name="tiny SmolLM2-like", batch=4, seq=16)
    config = json.loads((Path(__file__).parent / "smollm2_config.json").read_text())
    keep = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
            "vocab_size", "head_dim", "tie_word_embeddings", "max_position_embeddings", "rope_parameters")
    return Shape("SmolLM2-135M", {k: config[k] for k in keep}, batch=8, seq=1024)


# ---------------------------------------------------------------- one side, in its own process

def skip_reason(side: str, row: str, device: str, in_process: bool) -> str | None:
    """Why ``side`` cannot run ``row`` here, or None."""
    if side == "PEFT + Liger":
        if device != "cuda":
            return "Liger Kernel's ops are triton kernels: CUDA only"
        if in_process:
            return "Liger patches transformers' classes process-wide: it runs only in a process of its own"
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            return "liger-kernel is not installed (bring its wheel in .whl/)"
    if row == "qlora" and device != "cuda":
        return "nf4 training is a GPU row (bitsandbytes' CPU 4-bit path is not what users train on)"
    return None


def build_model(shape: Shape, row: str, device: str, dtype: torch.dtype):
    """Random weights of ``shape`` on ``device`` in ``dtype``; an nf4 base for ``qlora``."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(**shape.config)
    if row != "qlora":
        with torch.device(device):
            return LlamaForCausalLM(config).to(dtype).eval()
    import tempfile

    from transformers import BitsAndBytesConfig
    folder = tempfile.mkdtemp()
    with torch.device(device):
        LlamaForCausalLM(config).to(dtype).save_pretrained(folder)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=dtype)
    return LlamaForCausalLM.from_pretrained(folder, quantization_config=quantization, device_map=device,
                                            dtype=dtype).eval()


def lora_config(row: str):
    from peft import LoraConfig
    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", use_dora=row == "dora")


def adapted(side: str, model, row: str, compile_backend: str):
    """The trainable module of ``side``: what its ``train_step`` calls."""
    import fxpeft
    if side.startswith("fxpeft"):
        gm = fxpeft.rewrite(model, lora_config(row))
        return torch.compile(fxpeft.fuse(gm), backend=compile_backend) if "compiled" in side else gm
    from peft import get_peft_model
    if side == "PEFT + Liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True,
                                    cross_entropy=False, model=model)
    peft_model = get_peft_model(model, lora_config(row))
    return torch.compile(peft_model, backend=compile_backend) if side == "PEFT + compile" else peft_model


def train_step(module, parameters: list[torch.Tensor]) -> Callable[[torch.Tensor], float]:
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    module.train()

    def step(ids: torch.Tensor) -> float:
        loss = module(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())
    return step


def token_ids(vocab: int, batch: int, seq: int, device: str) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)


def measure_side(spec: dict) -> dict:
    """One side of one row: median step time over ``steps`` after ``warmup`` (compiles there),
    and the peak allocated GPU memory during the steps (the resident weights included)."""
    shape, device, dtype = Shape(**spec["shape"]), spec["device"], getattr(torch, spec["dtype"])
    started = time.perf_counter()
    model = build_model(shape, spec["row"], device, dtype)
    module = adapted(spec["side"], model, spec["row"], spec["compile_backend"])
    step = train_step(module, [p for p in module.parameters() if p.requires_grad])
    ids = token_ids(shape.config["vocab_size"], shape.batch, shape.seq, device)
    set_up = time.perf_counter() - started
    if device == "cuda":  # from here: the weights as they stay, plus training (not the fp32 init)
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for index in range(spec["warmup"] + spec["steps"]):
        synchronize()
        start = time.perf_counter()
        losses.append(step(ids))
        synchronize()
        if index >= spec["warmup"]:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / GIB if device == "cuda" else None
    return {"step_s": statistics.median(times), "peak_gib": peak, "set_up_s": set_up,
            "first_loss": losses[0], "last_loss": losses[-1]}


def longest_fitting(fits: Callable[[int], bool], start: int, limit: int, granularity: int,
                    deadline: float = float("inf")) -> tuple[int, int | None]:
    """(longest length known to fit, shortest known not to; None if none failed): ``fits`` is
    tried at ``start``, doubled up to ``limit``, then bisected to ``granularity``, stopping at
    ``deadline`` (a ``time.monotonic()`` value). Lengths are multiples of ``granularity``.

    >>> longest_fitting(lambda n: n <= 5000, start=1024, limit=65536, granularity=256)
    (4864, 5120)
    >>> longest_fitting(lambda n: True, start=1024, limit=4096, granularity=256)
    (4096, None)
    """
    fit, fail, length = 0, None, start
    while length <= limit and time.monotonic() < deadline:
        if not fits(length):
            fail = length
            break
        fit, length = length, length * 2
    while fail is not None and fail - fit > granularity and time.monotonic() < deadline:
        middle = (fit + fail) // 2 // granularity * granularity
        if fits(middle):
            fit = middle
        else:
            fail = middle
    return fit, fail


def measure_context(spec: dict) -> dict:
    """The longest batch-1 sequence whose training step fits: on CUDA under a per-process
    memory cap of ``budget_gib``; on the CPU (no cap to set) up to ``limit`` only."""
    shape, device, dtype = Shape(**spec["shape"]), spec["device"], getattr(torch, spec["dtype"])
    if device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec["budget_gib"] * GIB / total))
    model = build_model(shape, spec["row"], device, dtype)
    module = adapted(spec["side"], model, spec["row"], spec["compile_backend"])
    step = train_step(module, [p for p in module.parameters() if p.requires_grad])
    vocab = shape.config["vocab_size"]

    def fits(length: int) -> bool:
        try:
            step(token_ids(vocab, 1, length, device))
            synchronize()
            fitted = True
        except torch.OutOfMemoryError:
            fitted = False
        gc.collect()  # an OOM leaves the failed step's tensors to the collector
        if device == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps({"tried": length, "fits": fitted}), flush=True)  # the parent's, if it kills us
        return fitted
    deadline = time.monotonic() + spec["seconds"]
    fit, fail = longest_fitting(fits, spec["start"], spec["limit"], spec["granularity"], deadline)
    return {"longest": fit, "first_failing": fail, "deadline_hit": time.monotonic() >= deadline,
            "budget_gib": spec["budget_gib"] if device == "cuda" else None}


def child_main(spec: dict) -> None:
    # a side that stalls prints every thread's stack before its parent's limit kills it
    faulthandler.dump_traceback_later(max(1, spec["timeout"] - 10), exit=False)
    result = measure_context(spec) if spec["row"] == "context" else measure_side(spec)
    print(json.dumps(result))


# ---------------------------------------------------------------- the parent: rows, table, targets

def run_side(spec: dict, in_process: bool) -> dict:
    """``spec``'s result, or {"error": ...}: in a fresh process unless ``in_process``."""
    if in_process:
        try:
            return (measure_context if spec["row"] == "context" else measure_side)(spec)
        except Exception as error:  # one side failing is a row of the table, not the end of the run
            return {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    command = [sys.executable, __file__, "--child", json.dumps(spec)]
    code, stdout, stderr = run_child(command, timeout=spec["timeout"])
    if code is None:
        return {**_tried_so_far(stdout), "error": f"no result after {spec['timeout']} s", "stderr": stderr[-3000:]}
    if code:
        return {"error": f"exit {code}: {stderr.strip().splitlines()[-1][:300] if stderr.strip() else ''}",
                "stderr": stderr[-3000:]}
    return json.loads(stdout.strip().splitlines()[-1])


def _tried_so_far(stdout: str) -> dict:
    """A killed context search's result from the lengths it printed, if it printed any.

    >>> _tried_so_far('{"tried": 4096, "fits": true}\\n{"tried": 8192, "fits": false}\\n')
    {'longest': 4096, 'first_failing': 8192, 'deadline_hit': True}
    """
    tried = [json.loads(line) for line in stdout.splitlines() if line.startswith('{"tried"')]
    if not tried:
        return {}
    fitting = [t["tried"] for t in tried if t["fits"]]
    failing = [t["tried"] for t in tried if not t["fits"]]
    return {"longest": max(fitting, default=0), "first_failing": min(failing, default=None), "deadline_hit": True}


def section_rows(section: str, tiny: bool) -> tuple[str, Shape]:
    """(the adapter row, the shape) a section runs."""
    if section == "smollm2":
        return "lora", smollm2_shape(tiny)
    return ("lora" if section == "context" else section), TINY if tiny else LLAMA_1B


def run_section(section: str, args: argparse.Namespace, peak: float) -> dict:
    row, shape = section_rows(section, args.tiny)
    base_spec = {"shape": dataclasses.asdict(shape), "device": args.device, "dtype": args.dtype,
                 "compile_backend": args.compile_backend, "timeout": args.side_timeout}
    if section == "context":
        base_spec.update(row="context", budget_gib=args.budget_gib, seconds=args.context_seconds,
                         start=64 if args.tiny else 4096, granularity=16 if args.tiny else 1024,
                         limit=args.context_limit or shape.config["max_position_embeddings"])
    else:
        base_spec.update(row=row, steps=args.steps, warmup=args.warmup)
    flops = lora_step_flops(DecoderShape.of(_config(shape)), shape.batch, shape.seq, ALL_LINEAR, r=16,
                            dora=row == "dora").total
    results = {}
    for side in args.sides:
        reason = skip_reason(side, row, args.device, args.in_process)
        if reason:
            results[side] = {"skipped": reason}
            print(f"  {side}: skipped ({reason})", flush=True)
            continue
        spec = {**base_spec, "side": side}
        started = time.perf_counter()
        result = run_side(spec, args.in_process)
        if "step_s" in result:
            tokens = shape.batch * shape.seq
            result.update(tokens_per_s=tokens / result["step_s"], mfu=mfu(flops, result["step_s"], peak))
        results[side] = result
        print(f"  {side}: {_brief(result)} ({time.perf_counter() - started:.0f} s)", flush=True)
    return {"shape": dataclasses.asdict(shape), "row": row, "step_flops": flops, "sides": results}


def _config(shape: Shape):
    from transformers import LlamaConfig
    return LlamaConfig(**shape.config)


def _brief(result: dict) -> str:
    if "step_s" in result:
        memory = f", peak {result['peak_gib']:.2f} GiB" if result.get("peak_gib") is not None else ""
        return f"{result['step_s'] * 1000:.1f} ms/step{memory}"
    if "longest" in result:
        return f"longest {result['longest']} (first failing {result['first_failing']})"
    return result.get("error", str(result))


def ratio_table(section: str, data: dict) -> list[str]:
    """Each side's numbers and its ratios to PEFT eager and to the better of PEFT + compile and
    PEFT + Liger (lower is better for time and memory; higher for context)."""
    sides = data["sides"]
    key = "longest" if section == "context" else "step_s"
    value = {s: r[key] for s, r in sides.items() if key in r}
    competitors = [value[s] for s in COMPETITORS if s in value]
    best = (max if key == "longest" else min)(competitors) if competitors else None
    lines = [f"\n{section}: {data['shape']['name']}, {data['row']}, batch {data['shape']['batch']} x "
             f"{data['shape']['seq']}" + (" (context: batch 1)" if key == "longest" else "")]
    if key == "longest":
        lines.append(f"  {'side':<26}{'longest':>9}{'x PEFT eager':>14}{'x best PEFT+':>14}")
    else:
        lines.append(f"  {'side':<26}{'ms/step':>9}{'tokens/s':>10}{'MFU':>8}{'peak GiB':>10}"
                     f"{'x PEFT eager':>14}{'x best PEFT+':>14}{'mem x eager':>13}")
    eager = sides.get("PEFT eager", {})
    for side, result in sides.items():
        if side not in value:
            lines.append(f"  {side:<26}{result.get('skipped') or result.get('error')}")
            continue
        against_eager = _ratio(value[side], value.get("PEFT eager"))
        against_best = _ratio(value[side], best)
        if key == "longest":
            lines.append(f"  {side:<26}{value[side]:>9}{against_eager:>14}{against_best:>14}")
            continue
        peak = result.get("peak_gib")
        memory = _ratio(peak, eager.get("peak_gib")) if peak is not None else "n/a"
        lines.append(f"  {side:<26}{value[side] * 1000:>9.1f}{result['tokens_per_s']:>10.0f}{result['mfu']:>8.1%}"
                     f"{peak if peak is not None else float('nan'):>10.2f}{against_eager:>14}{against_best:>14}"
                     f"{memory:>13}")
    return lines


def _ratio(value: float | None, reference: float | None) -> str:
    return f"{value / reference:.3f}" if value is not None and reference else "n/a"


TARGETS = (  # (what, section, numerator side, denominator side or "best", target, better when)
    ("fused + compiled step / PEFT eager", "lora", "step_s", "PEFT eager", 0.75, "below"),
    ("fused + compiled step / best of PEFT + compile, PEFT + Liger", "lora", "step_s", "best", 0.90, "below"),
    ("fused + compiled peak memory / PEFT eager's", "lora", "peak_gib", "PEFT eager", 0.60, "below"),
    ("fused + compiled longest context / PEFT eager's", "context", "longest", "PEFT eager", 4.0, "above"),
)


def check_targets(report: dict) -> list[str]:
    """Issue 29's targets, each met or missed by how much, from whatever sections ran."""
    lines = ["\ntargets (fxpeft fused + compiled):"]
    for what, section, key, against, target, better in TARGETS:
        sides = report.get(section, {}).get("sides", {})
        ours = sides.get(TARGET_SIDE, {}).get(key)
        if against == "best":
            candidates = [sides[s][key] for s in COMPETITORS if key in sides.get(s, {})]
            reference = min(candidates) if candidates else None
        else:
            reference = sides.get(against, {}).get(key)
        lines.append(f"  {what}: " + _verdict(ours, reference, target, better))
    lora, dora = report.get("lora", {}).get("sides", {}), report.get("dora", {}).get("sides", {})
    for side in (TARGET_SIDE, "PEFT eager"):
        ratio = (dora.get(side, {}).get("step_s"), lora.get(side, {}).get("step_s"))
        target = f"{_verdict(*ratio, 1.10, 'below')}" if side == TARGET_SIDE else \
            (f"{ratio[0] / ratio[1]:.3f} (issue: about 1.26)" if None not in ratio else "not measured")
        lines.append(f"  DoRA step / LoRA step, {side}: {target}")
    return lines


def _verdict(ours: float | None, reference: float | None, target: float, better: str) -> str:
    if ours is None or not reference:
        return "not measured"
    ratio = ours / reference
    met = ratio <= target if better == "below" else ratio >= target
    gap = abs(ratio - target)
    return f"{ratio:.3f} (target {'<=' if better == 'below' else '>='} {target}): " + \
        ("met" if met else f"missed by {gap:.3f}")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="lora", help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, of {', '.join(SIDES)}")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU test of this script)")
    parser.add_argument("--device", default=None, help="cuda where available, else cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--budget-gib", type=float, default=40.0)
    parser.add_argument("--context-seconds", type=float, default=60.0, help="per side, for the context search")
    parser.add_argument("--context-limit", type=int, default=0, help="longest length tried (default: the model's)")
    parser.add_argument("--side-timeout", type=int, default=240, help="seconds a side's process may take")
    parser.add_argument("--in-process", action="store_true", help="every side in this process (tests)")
    parser.add_argument("--json", default=None, help="read, updated with these sections, written back")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.sides = [s.strip() for s in args.sides.split(",")]
    args.sections = [s.strip() for s in args.sections.split(",")]
    for given, known, what in ((args.sides, SIDES, "side"), (args.sections, SECTIONS, "section")):
        unknown = sorted(set(given) - set(known))
        if unknown:
            parser.error(f"unknown {what} {unknown}; choose from {', '.join(known)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if args.child:
        child_main(json.loads(args.child))
        return {}
    exit_on_sigterm()
    path = Path(args.json) if args.json else None
    report = json.loads(path.read_text()) if path and path.is_file() else {}
    dtype = getattr(torch, args.dtype)
    peak = measured_peak_flops(args.device, dtype)
    print(f"{machine_line()}\npeak: {dtype} GEMM on {args.device}, {peak / 1e12:.3f} TFLOP/s", flush=True)
    report["machine"], report["peak_flops"] = machine_line(), peak
    for section in args.sections:
        print(f"\n== {section}", flush=True)
        result = run_section(section, args, peak)
        earlier = report.get(section, {}).get("sides", {}) if report.get(section, {}).get("shape") == result["shape"] else {}
        report[section] = {**result, "sides": {**earlier, **result["sides"]}}  # a rerun of some sides keeps the rest
        if path:  # after every section, so a later one's time limit loses nothing
            path.write_text(json.dumps(report, indent=2))
    lines = [line for section in SECTIONS if section in report for line in ratio_table(section, report[section])]
    print("\n".join(lines + check_targets(report)))
    return report


if __name__ == "__main__":
    main()
