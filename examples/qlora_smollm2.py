"""QLoRA on the real SmolLM2-135M: a 4-bit nf4 base, LoRA on q_proj and v_proj, gradient
checkpointing, on Shakespeare.

    python examples/qlora_smollm2.py               # defaults finish in minutes on 2 cores

The base is quantized on load by bitsandbytes (nf4, double quantization; fp32 compute by
default on CPUs: bitsandbytes' CPU 4-bit matmul measured about 2.5x slower in bf16 than in fp32
here, without its optional `kernels` package; `--compute bf16` switches). ``fxpeft.rewrite`` captures each 4-bit layer as one op, and
``fxpeft.fuse(gm, checkpoint="layers")`` gives the training copy: fused LM-head loss, each layer
recomputed in backward. It prints the loss going down, held-out perplexity before and after,
and peak memory against an fp32 LoRA run of the same batch (a few steps, in a subprocess), then
saves the adapter in HF PEFT's format.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

import fxpeft
from fxpeft.helpers.data import (example_arguments, perplexity, shakespeare_text, token_blocks,
                                 train_on_blocks)
from fxpeft.helpers.memory import (STEADY_MALLOC_ENV, current_rss_mib, own_memory, peak_rss_mib,
                                   release_freed_memory, reset_peak_rss)
from fxpeft.helpers.models import load_smollm2
from fxpeft.tools.plots import save_with_curve


def parse_args() -> argparse.Namespace:
    parser = example_arguments(__doc__.split("\n")[0], steps=30, eval_blocks=8,
                               output="out/smollm2-shakespeare-qlora")
    parser.add_argument("--compute", choices=["bf16", "fp32"], default="fp32",
                        help="the 4-bit layers' compute dtype")
    parser.add_argument("--compare-steps", type=int, default=3,
                        help="steps of the fp32 LoRA run measured for memory (0: skip it)")
    parser.add_argument("--fp32-baseline", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def nf4_config(compute: str):
    from transformers import BitsAndBytesConfig
    compute = {"bf16": torch.bfloat16, "fp32": torch.float32}[compute]
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)


def train(model: torch.nn.Module, blocks: torch.Tensor, args: argparse.Namespace, steps: int,
          report: bool = True) -> tuple[list[float], float]:
    """Train ``model`` for ``steps``: the losses, and the peak RSS over the RSS before (MiB)."""
    release_freed_memory()
    reset_peak_rss()
    losses = train_on_blocks(model, blocks, steps=steps, batch_size=args.batch_size, lr=args.lr,
                             seed=args.seed, progress=report, every=5 if report else 0)
    return losses, peak_rss_mib()


def fp32_baseline(args: argparse.Namespace) -> None:
    """The fp32 LoRA run (unquantized, no checkpointing), a few steps: prints its memory."""
    before = current_rss_mib()
    model, tokenizer = load_smollm2()
    own_memory(model)
    blocks = token_blocks(tokenizer, shakespeare_text(args.play), args.seq_len)
    gm = fxpeft.rewrite(model, args.rules)
    peak = train(gm, blocks, args, args.compare_steps, report=False)[1]
    print(json.dumps({"peak_over_start": peak - before}))


def measure_fp32_baseline(args: argparse.Namespace) -> float:
    command = [sys.executable, __file__, "--fp32-baseline", "--compare-steps", str(args.compare_steps),
               "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--rules", args.rules]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_over_start"]


def main() -> None:
    if any(os.environ.get(k) != v for k, v in STEADY_MALLOC_ENV.items()):
        # Re-run with glibc's mmap threshold fixed, so RSS follows live tensors (fxpeft.helpers.memory).
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **STEADY_MALLOC_ENV})
    args = parse_args()
    torch.manual_seed(args.seed)
    if args.fp32_baseline:
        return fp32_baseline(args)
    start, before = time.perf_counter(), current_rss_mib()
    config = nf4_config(args.compute)
    model, tokenizer = load_smollm2(quantization_config=config)
    own_memory(model)  # lets the fp32 checkpoint's mapped pages go (fxpeft.helpers.memory)
    blocks = token_blocks(tokenizer, shakespeare_text(args.play), args.seq_len)
    held_out, train_blocks = blocks[: args.eval_blocks], blocks[args.eval_blocks:]
    print(f"{args.play}: {len(train_blocks)} training blocks, {len(held_out)} held-out blocks of "
          f"{args.seq_len} tokens; nf4 base, {str(config.bnb_4bit_compute_dtype)[6:]} compute")
    gm = fxpeft.rewrite(model, args.rules)
    fxpeft.trainable_parameters(gm, print_line=True)
    before_ppl = perplexity(gm, held_out, args.batch_size)
    print(f"held-out perplexity before: {before_ppl:.2f}")
    losses, peak = train(fxpeft.fuse(gm, checkpoint="layers"), train_blocks, args, args.steps)
    after_ppl = perplexity(gm, held_out, args.batch_size)
    print(f"held-out perplexity after:  {after_ppl:.2f} ({100 * (after_ppl - before_ppl) / before_ppl:+.1f}%)")
    ours = peak - before
    if args.compare_steps:
        baseline = measure_fp32_baseline(args)
        print(f"peak memory (RSS over the process before loading): QLoRA + checkpointing {ours:.0f} MiB, "
              f"fp32 LoRA {baseline:.0f} MiB: {ours / baseline:.2f}x")
    folder, curve = save_with_curve(gm, losses, args.output)
    print(f"adapter saved to {folder}, loss curve to {curve} "
          f"({time.perf_counter() - start:.0f} s in all)")


if __name__ == "__main__":
    main()
