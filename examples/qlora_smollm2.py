"""QLoRA on the real SmolLM2-135M: a 4-bit nf4 base, LoRA on q_proj and v_proj, gradient
checkpointing, on Shakespeare.

    python examples/qlora_smollm2.py               # defaults finish in minutes on 2 cores

The base is quantized on load by bitsandbytes (nf4, double quantization; bf16 compute where the
CPU has AVX512-BF16, else fp32). ``fxpeft.rewrite`` captures each 4-bit layer as one op, and
``fxpeft.fuse(gm, checkpoint="layers")`` gives the training copy: fused LM-head loss, each layer
recomputed in backward. It prints the loss going down, held-out perplexity before and after,
and peak memory against an fp32 LoRA run of the same batch (a few steps, in a subprocess), then
saves the adapter in HF PEFT's format.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time

import torch
from tqdm import tqdm

import fxpeft
from fxpeft.data import shakespeare_text, token_blocks
from fxpeft.memory import current_rss_mib, peak_rss_mib, reset_peak_rss
from fxpeft.models import load_smollm2


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--play", default="hamlet")
    parser.add_argument("--rules", default="lora_qv.toml")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-blocks", type=int, default=8)
    parser.add_argument("--compare-steps", type=int, default=3,
                        help="steps of the fp32 LoRA run measured for memory (0: skip it)")
    parser.add_argument("--fp32-baseline", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output", default="out/smollm2-shakespeare-qlora")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def nf4_config():
    from transformers import BitsAndBytesConfig
    compute = torch.bfloat16 if torch.cpu._is_avx512_bf16_supported() else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)


@torch.no_grad()
def perplexity(gm: torch.nn.Module, blocks: torch.Tensor, batch_size: int) -> float:
    gm.eval()
    losses = [gm(input_ids=chunk, labels=chunk).loss.item() for chunk in blocks.split(batch_size)]
    return math.exp(sum(losses) / len(losses))


def train(model: torch.nn.Module, blocks: torch.Tensor, args: argparse.Namespace, steps: int,
          report: bool = True) -> float:
    """Train ``model`` for ``steps``; returns the peak RSS over the RSS before training (MiB)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    reset_peak_rss()
    progress = tqdm(range(steps), desc="training", unit="step", disable=not report)
    for step in progress:
        batch = blocks[torch.randint(len(blocks), (args.batch_size,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        progress.set_postfix(loss=f"{loss.item():.3f}")
        if report and (step % 10 == 0 or step == steps - 1):
            progress.write(f"step {step:3d}  loss {loss.item():.3f}")
    return peak_rss_mib()


def fp32_baseline(args: argparse.Namespace) -> None:
    """The fp32 LoRA run (unquantized, no checkpointing), a few steps: prints its memory."""
    before = current_rss_mib()
    model, tokenizer = load_smollm2()
    blocks = token_blocks(tokenizer, shakespeare_text(args.play), args.seq_len)
    gm = fxpeft.rewrite(model, args.rules)
    peak = train(gm, blocks, args, args.compare_steps, report=False)
    print(json.dumps({"peak_over_start": peak - before}))


def measure_fp32_baseline(args: argparse.Namespace) -> float:
    command = [sys.executable, __file__, "--fp32-baseline", "--compare-steps", str(args.compare_steps),
               "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--rules", args.rules]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_over_start"]


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    if args.fp32_baseline:
        return fp32_baseline(args)
    start, before = time.perf_counter(), current_rss_mib()
    config = nf4_config()
    model, tokenizer = load_smollm2(quantization_config=config)
    blocks = token_blocks(tokenizer, shakespeare_text(args.play), args.seq_len)
    held_out, train_blocks = blocks[: args.eval_blocks], blocks[args.eval_blocks:]
    print(f"{args.play}: {len(train_blocks)} training blocks, {len(held_out)} held-out blocks of "
          f"{args.seq_len} tokens; nf4 base, {str(config.bnb_4bit_compute_dtype)[6:]} compute")
    gm = fxpeft.rewrite(model, args.rules)
    fxpeft.trainable_parameters(gm, print_line=True)
    before_ppl = perplexity(gm, held_out, args.batch_size)
    print(f"held-out perplexity before: {before_ppl:.2f}")
    peak = train(fxpeft.fuse(gm, checkpoint="layers"), train_blocks, args, args.steps)
    after_ppl = perplexity(gm, held_out, args.batch_size)
    print(f"held-out perplexity after:  {after_ppl:.2f} ({100 * (after_ppl - before_ppl) / before_ppl:+.1f}%)")
    ours = peak - before
    if args.compare_steps:
        baseline = measure_fp32_baseline(args)
        print(f"peak memory (RSS over the process before loading): QLoRA + checkpointing {ours:.0f} MiB, "
              f"fp32 LoRA {baseline:.0f} MiB: {ours / baseline:.2f}x")
    folder = fxpeft.save(gm, args.output)
    print(f"adapter saved to {folder} ({time.perf_counter() - start:.0f} s in all)")


if __name__ == "__main__":
    main()
