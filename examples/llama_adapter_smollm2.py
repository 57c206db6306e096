"""Instruction-tune the real SmolLM2-135M-Instruct with LLaMA-Adapter on questions about a play.

    python examples/llama_adapter_smollm2.py       # defaults finish in a few minutes on 2 cores

Builds "Who speaks next?" and "Continue the line" instructions from one play
(``fxpeft.helpers.data.play_instructions``), formats them with SmolLM2's chat template and masks the
prompt out of the labels, rewrites the model with ``llama_adapter.toml`` (gated prompts in the
top two attention layers), trains, and prints greedy answers (``fxpeft.generate``) to held-out
instructions before and after, with the exact-match rate on "Who speaks next?". Saves the adapter
in HF PEFT's format and its loss curve beside it (``<output>-loss.png``).
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

import torch

import fxpeft
from fxpeft.helpers.data import (answers, chat_prompt, example_arguments, instruction_batch,
                                 play_instructions, shakespeare_text, train_on_blocks)
from fxpeft.helpers.models import load_smollm2
from fxpeft.tools.plots import save_with_curve


def parse_args(argv: "list[str] | None" = None) -> argparse.Namespace:
    parser = example_arguments(__doc__.split("\n")[0], steps=60, eval_blocks=24,
                               output="out/smollm2-llama-adapter")
    parser.set_defaults(rules="llama_adapter.toml", lr=1e-2)
    parser.add_argument("--show", type=int, default=4, help="held-out answers to print")
    return parser.parse_args(argv)


def report(gm: torch.nn.Module, tokenizer: Any, held_out: list[tuple[str, str]],
           show: int, when: str) -> None:
    """Greedy answers to the held-out instructions: a few printed, the exact-match rate on
    "Who speaks next?"."""
    prompts = [chat_prompt(tokenizer, instruction) for instruction, _ in held_out]
    replies = answers(gm, tokenizer, prompts, 12, pad_id=tokenizer.eos_token_id)
    for (instruction, answer), reply in list(zip(held_out, replies))[:show]:
        print(f"  [{when}] {instruction.splitlines()[-1][:60]!r} -> {reply.strip()!r} "
              f"(expected {answer!r})")
    speakers = [(reply.strip(), answer) for (instruction, answer), reply in zip(held_out, replies)
                if instruction.startswith("Who speaks next?")]
    hits = sum(reply == answer for reply, answer in speakers)
    print(f"{when}: 'Who speaks next?' exact match {hits}/{len(speakers)}")


def main(argv: "list[str] | None" = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    model, tokenizer = load_smollm2()
    pairs = play_instructions(shakespeare_text(args.play))
    random.Random(args.seed).shuffle(pairs)
    held_out, train_pairs = pairs[: args.eval_blocks], pairs[args.eval_blocks:]
    print(f"{args.play}: {len(train_pairs)} training instructions, {len(held_out)} held out")
    ids, labels = instruction_batch(tokenizer, train_pairs[: args.steps * args.batch_size],
                                    end_id=tokenizer.eos_token_id, pad_id=tokenizer.eos_token_id)
    ids, labels = ids[:, : args.seq_len], labels[:, : args.seq_len]
    gm = fxpeft.rewrite(model, args.rules)
    fxpeft.trainable_parameters(gm, print_line=True)
    report(gm, tokenizer, held_out, args.show, "before")
    losses = train_on_blocks(gm, ids, labels=labels, steps=args.steps,
                             batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    report(gm, tokenizer, held_out, args.show, "after")
    folder, curve = save_with_curve(gm, losses, args.output)
    print(f"adapter saved to {folder}, loss curve to {curve} "
          f"({time.perf_counter() - start:.0f} s in all)")


if __name__ == "__main__":
    main()
