"""Peak training memory and step time: HF PEFT (with and without HF gradient checkpointing)
against fxpeft, its fused copy (fused LM-head loss), the fused copy with gradient checkpointing
(``fuse(gm, checkpoint="layers")``) and QLoRA (nf4 base), each in a fresh subprocess, LoRA q,v,
a few AdamW steps.

On the CPU, two numbers per variant, both peak RSS during the training steps (freed memory is returned to
the OS and the peak reset through /proc/self/clear_refs once the adapted model is built, so
loading and capture are left out; each child runs with a fixed glibc mmap threshold, so RSS
follows live tensors rather than the heap's high-water mark):
- ``total``: minus the RSS before the model was loaded: the model's weights plus training;
- ``training``: minus the RSS just before the steps: what training adds.

With ``--device cuda`` the same two numbers come from the GPU's allocator instead
(``torch.cuda.max_memory_allocated``; ``total`` counts from an empty GPU). ``--model
smollm2-shape`` is SmolLM2-135M's architecture (``bench/smollm2_config.json``) with random
weights, for machines without the real checkpoint.

    python bench/memory.py [--model smollm2|smollm2-shape|llama] [--batch 4 --seq 128 --steps 2]
                           [--variants A,B] [--device cuda]
    python bench/memory.py --step-time 7    # step time only: PEFT, fxpeft, fused, interleaved

Step times from the memory children are each from a separate process and only a few steps, so
``--step-time N`` measures them properly instead: the three sides on one model in one process,
interleaved step by step, medians of N steps after one warm-up round.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import exit_on_sigterm, interleaved_medians, machine_line, run_child, synchronize  # noqa: E402

from fxpeft.helpers.memory import (STEADY_MALLOC_ENV, current_rss_mib, own_memory, peak_rss_mib,
                                   release_freed_memory, reset_peak_rss)

VARIANTS = ("PEFT", "PEFT + HF checkpointing", "fxpeft", "fxpeft fused",
            "fxpeft fused + checkpoint", "fxpeft nf4 fused", "fxpeft nf4 fused + checkpoint")


def _nf4():
    import torch
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)


def _config(name: str):
    from transformers import LlamaConfig
    if name == "smollm2-shape":
        return LlamaConfig.from_json_file(Path(__file__).parent / "smollm2_config.json")
    return LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
                       num_attention_heads=9, num_key_value_heads=3, vocab_size=49152)


def _model(name: str, variant: str, device: str = "cpu"):
    import torch
    quantization = _nf4() if "nf4" in variant else None
    if name == "smollm2":
        from fxpeft.helpers.models import load_smollm2
        return load_smollm2(quantization_config=quantization)[0].to(device)
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config(name)).eval()
    if quantization is None:
        return model.to(device)
    import tempfile
    folder = tempfile.mkdtemp()
    model.save_pretrained(folder)
    return LlamaForCausalLM.from_pretrained(folder, quantization_config=quantization, device_map=device)


def _adapted(variant: str, model):
    import fxpeft
    if variant.startswith("PEFT"):
        from peft import LoraConfig, get_peft_model
        if "checkpointing" in variant:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    gm = fxpeft.rewrite(model, "lora_qv", dropout=0.0)
    if "fused" not in variant:
        return gm
    return fxpeft.fuse(gm, checkpoint="layers" if "checkpoint" in variant else None)


def child(args: argparse.Namespace) -> None:
    """One variant: print {"before": MiB, "loaded": MiB, "peak": MiB, "step": s}."""
    import time

    import torch
    import transformers  # noqa: F401  (imported before the baseline, as every variant needs it)
    if "nf4" in args.variant:
        import bitsandbytes  # noqa: F401
    gpu = args.device == "cuda"
    started = time.perf_counter()
    # a variant that stalls prints every thread's stack (where it waits) before its limit kills it
    faulthandler.dump_traceback_later(max(1.0, args.timeout - 5), exit=False)

    def stage(name: str) -> None:  # on stderr, so a variant that times out says how far it got
        print(f"{time.perf_counter() - started:7.1f} s  {name}", file=sys.stderr, flush=True)
    before = _gpu_mib() if gpu else current_rss_mib()
    stage("baseline read")
    model = _model(args.model, args.variant, args.device)
    stage("model built")
    if not gpu:
        own_memory(model)  # the checkpoint's mapped pages go: RSS counts what the model holds
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(0)).to(args.device)
    adapted = _adapted(args.variant, model).train()
    stage("adapted")
    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-4)
    if gpu:  # the allocator's own counters; the RSS helpers below are the CPU's measure
        torch.cuda.reset_peak_memory_stats()
    else:
        release_freed_memory()  # what loading and quantizing freed
        reset_peak_rss()
    loaded = _gpu_mib() if gpu else current_rss_mib()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        adapted(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize()
        times.append(time.perf_counter() - start)
        stage(f"step {len(times)}")
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if gpu else peak_rss_mib()
    print(json.dumps({"before": before, "loaded": loaded, "peak": peak,
                      "step": min(times[1:] or times)}))


def _gpu_mib() -> float:
    import torch
    return torch.cuda.memory_allocated() / 2 ** 20


def step_times(args: argparse.Namespace) -> None:
    """PEFT, fxpeft and the fused copy on one model, interleaved: median step time ratios."""
    import copy

    import torch

    import fxpeft
    from run import peft_lora, training_step
    model = _model(args.model, "fxpeft", args.device)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(0)).to(args.device)
    gm = fxpeft.rewrite(copy.deepcopy(model), "lora_qv", dropout=0.0)
    sides = {"fxpeft": training_step(gm, ids), "fxpeft fused": training_step(fxpeft.fuse(gm), ids),
             "PEFT": training_step(peft_lora(model), ids)}
    medians = interleaved_medians(sides, args.step_time, 1)
    print(f"{args.model}, batch {args.batch} x {args.seq}, LoRA q,v: training step, sides interleaved\n"
          f"{machine_line()}")
    for side, seconds in medians.items():
        print(f"  {side:<14}{seconds:8.3f} s  {seconds / medians['PEFT']:.3f} x PEFT")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "smollm2-shape", "llama"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    for name, default in (("batch", 4), ("seq", 128), ("steps", 2)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # one child's variant
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated subset to run; PEFT is always run (the reference)")
    parser.add_argument("--timeout", type=float, default=600,
                        help="seconds a variant's process may take before it is reported and skipped")
    parser.add_argument("--step-time", type=int, default=0, metavar="N",
                        help="instead: step times of PEFT, fxpeft and fused, interleaved, N steps")
    args = parser.parse_args()
    if args.variant:
        return child(args)
    if args.step_time:
        return step_times(args)
    exit_on_sigterm()
    print(f"{args.model} on {args.device}, batch {args.batch} x {args.seq}, LoRA q,v, {args.steps} AdamW steps\n"
          f"{machine_line()}")
    results = {}
    chosen = {v.strip() for v in args.variants.split(",")} | {"PEFT"}
    unknown = chosen - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    for variant in [v for v in VARIANTS if v in chosen]:
        command = [sys.executable, __file__, "--variant", variant, "--model", args.model,
                   "--device", args.device,
                   "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)]
        steady = STEADY_MALLOC_ENV if args.device == "cpu" else {}  # RSS is not measured there
        command += ["--timeout", str(args.timeout)]  # the child dumps its stacks just before
        code, stdout, stderr = run_child(command, {**os.environ, **steady}, args.timeout)
        if code is None:
            print(f"  {variant}: no result after {args.timeout:.0f} s; it had reached:\n{stderr[-3000:]}")
            continue
        if code:
            raise SystemExit(f"{variant} failed:\n{stderr[-2000:]}")
        results[variant] = json.loads(stdout.strip().splitlines()[-1])
    if "PEFT" in results:
        print_table(results)


def print_table(results: dict[str, dict]) -> None:
    """Each variant's peaks and step time, and their ratios to PEFT's (and nf4 to fp32)."""
    total = {v: r["peak"] - r["before"] for v, r in results.items()}
    training = {v: r["peak"] - r["loaded"] for v, r in results.items()}
    step = {v: r["step"] for v, r in results.items()}
    print(f"  {'variant':<30}{'total MiB':>10}{'x PEFT':>8}{'training MiB':>14}{'x PEFT':>8}"
          f"{'step s':>8}{'x PEFT':>8}")
    for variant in results:
        print(f"  {variant:<30}{total[variant]:>10.0f}{total[variant] / total['PEFT']:>8.3f}"
              f"{training[variant]:>14.0f}{training[variant] / training['PEFT']:>8.3f}"
              f"{step[variant]:>8.2f}{step[variant] / step['PEFT']:>8.3f}")
    for quantized in [v for v in results if "nf4" in v and v.replace("nf4 ", "") in results]:
        dense = quantized.replace("nf4 ", "")
        print(f"  {quantized} / {dense}: total {total[quantized] / total[dense]:.3f}")


if __name__ == "__main__":
    main()
