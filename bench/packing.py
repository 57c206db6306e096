"""Tokens per second of LoRA training on padded batches against padding-free packed rows, on the
main job's data (the speeches of a play, ``examples/finetune_smollm2.py``'s Shakespeare, one
sample per speech, cut at ``--max-len`` tokens, SmolLM2's tokenizer).

    python bench/packing.py [--model smollm2-shape|smollm2] [--layers 4] [--batch 8]
                            [--max-len 128] [--steps 6]

- padded: ``--batch`` samples per step, right-padded to the longest, with an attention mask.
- packed: the same samples concatenated into one row with ``position_ids`` restarting at each and
  no attention mask (what ``DataCollatorWithFlattening`` and TRL's ``padding_free`` build); the
  graph keeps the samples apart (``fxpeft.runtime.masks``).

Both sides train the same ``fxpeft.fuse`` copy of a LoRA q,v graph (r=8) with AdamW, the steps
interleaved, the same samples in the same order; medians after a warm-up. ``smollm2-shape`` is
SmolLM2-135M's architecture with random weights and ``--layers`` layers; ``smollm2`` the real
model (all 30 layers: slow on 2 cores). Tokens are the samples' own, padding not counted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import fxpeft  # noqa: E402
from common import interleaved_times, machine_line  # noqa: E402
from fxpeft.helpers.data import shakespeare_text, speeches  # noqa: E402
from fxpeft.helpers.models import load_smollm2  # noqa: E402


def samples(tokenizer, play: str, max_len: int) -> list[list[int]]:
    texts = [f"{speaker}\n" + "\n".join(lines) for speaker, lines in speeches(shakespeare_text(play))]
    return [tokenizer(t, add_special_tokens=False)["input_ids"][:max_len] for t in texts]


def padded(batch: list[list[int]], pad: int) -> dict[str, torch.Tensor]:
    longest = max(map(len, batch))
    ids = torch.full((len(batch), longest), pad)
    mask = torch.zeros_like(ids)
    for row, sample in enumerate(batch):
        ids[row, :len(sample)], mask[row, :len(sample)] = torch.tensor(sample), 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def packed(batch: list[list[int]]) -> dict[str, torch.Tensor]:
    ids = torch.tensor([t for sample in batch for t in sample])[None]
    positions = torch.cat([torch.arange(len(sample)) for sample in batch])[None]
    labels = ids.masked_fill(positions == 0, -100)  # no target across a boundary
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


def model_and_tokenizer(args):
    model, tokenizer = load_smollm2()
    if args.model == "smollm2-shape":
        from transformers import LlamaConfig, LlamaForCausalLM
        config = LlamaConfig.from_json_file(Path(__file__).parent / "smollm2_config.json")
        config.num_hidden_layers = args.layers
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    return model, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-shape", choices=["smollm2-shape", "smollm2"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--play", default="hamlet")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = model_and_tokenizer(args)
    data = samples(tokenizer, args.play, args.max_len)
    rounds = args.warmup + args.steps
    batches = [data[i * args.batch:(i + 1) * args.batch] for i in range(rounds)]
    gm = fxpeft.rewrite(model, "lora_qv.toml", r=8, alpha=16, dropout=0.0).train()
    fused = fxpeft.fuse(gm)
    optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-4)
    inputs = {"padded": [padded(b, tokenizer.eos_token_id) for b in batches],
              "packed": [packed(b) for b in batches]}
    counters = {name: iter(values) for name, values in inputs.items()}

    def step(name: str):
        def run() -> None:
            fused(**next(counters[name])).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return run

    times = interleaved_times({name: step(name) for name in inputs}, args.steps, args.warmup)
    tokens = [sum(map(len, b)) for b in batches[args.warmup:]]
    print(machine_line())
    print(f"{args.model} ({args.layers if args.model == 'smollm2-shape' else 30} layers), LoRA q,v r=8, "
          f"{args.batch} speeches of {args.play} per step (cut at {args.max_len} tokens), "
          f"{statistics.mean(tokens):.0f} tokens per step on average, {args.steps} steps after "
          f"{args.warmup} warm-up")
    rates = {}
    for name, seconds in times.items():
        shape = tuple(inputs[name][args.warmup]["input_ids"].shape)
        rates[name] = sum(tokens) / sum(seconds)
        print(f"{name:<8} median {statistics.median(seconds) * 1000:8.1f} ms/step  "
              f"{rates[name]:8.0f} tokens/s  (first measured batch {shape})")
    print(f"packed / padded tokens per second: {rates['packed'] / rates['padded']:.2f}")


if __name__ == "__main__":
    main()
