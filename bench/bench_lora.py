"""One LoRA training step: fxpeft's graph vs HF PEFT (and the frozen base), same model, same run.

    python bench/bench_lora.py [--layers 4 --hidden 256 --batch 8 --seq 128 --steps 10]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved_medians, print_ratios  # noqa: E402

import fxpeft  # noqa: E402


def tiny_llama(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 4,
                                        num_hidden_layers=args.layers, num_attention_heads=8,
                                        num_key_value_heads=4, vocab_size=8192)).eval()


def step_fn(model: torch.nn.Module, ids: torch.Tensor) -> callable:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    model.train()

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    for name, default in (("layers", 4), ("hidden", 256), ("batch", 8), ("seq", 128), ("steps", 10),
                          ("warmup", 3)):
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()
    from peft import LoraConfig, get_peft_model
    base = tiny_llama(args)
    ids = torch.randint(0, 8192, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                                target_modules=["q_proj", "v_proj"]))
    gm = fxpeft.rewrite(copy.deepcopy(base), "lora_qv.toml")
    frozen = copy.deepcopy(base).requires_grad_(False)
    sides = {"fxpeft LoRA q,v": step_fn(gm, ids), "HF PEFT LoRA q,v": step_fn(peft_model, ids),
             "base forward only": step_fn(frozen, ids)}
    print(f"tiny Llama: {args.layers} layers, hidden {args.hidden}, batch {args.batch} x seq {args.seq}")
    print_ratios(interleaved_medians(sides, args.steps, args.warmup), "HF PEFT LoRA q,v")


if __name__ == "__main__":
    main()
