"""One LLaMA-Adapter training step: fxpeft's graph vs HF PEFT's AdaptionPromptConfig, same model,
same run, sides interleaved step by step, medians after warm-up.

PEFT wraps each adapted attention module: it recomputes the query projection and RoPE and runs
o_proj a second time. fxpeft's pass reuses the query the graph already computed and adds the
prompt branch before the single o_proj.

    python bench/bench_adaption_prompt.py              # real SmolLM2-135M (30 layers)
    python bench/bench_adaption_prompt.py --tiny       # tiny Llama from a config
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_lora import step_fn  # noqa: E402
from common import interleaved_medians, print_ratios  # noqa: E402

import fxpeft  # noqa: E402
from fxpeft.rules import RuleSet, load_rules  # noqa: E402

PEFT_SIDE = "HF PEFT adaption prompt"


def load_model(args: argparse.Namespace) -> tuple[torch.nn.Module, str]:
    if not args.tiny:
        from fxpeft.helpers.models import load_smollm2
        return load_smollm2()[0], "SmolLM2-135M"
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, vocab_size=8192)
    return LlamaForCausalLM(config).eval(), "tiny Llama (4 layers, hidden 256)"


def top_layers_rules(count: int) -> RuleSet:
    """The bundled llama_adapter.toml, moved to the top ``count`` layers (PEFT's adapter_layers)."""
    rules = load_rules("llama_adapter.toml")
    return dataclasses.replace(rules, rules=tuple(
        dataclasses.replace(r, where=dataclasses.replace(r.where, layer_range=(-count, -1)))
        for r in rules.rules))


def main() -> None:
    parser = argparse.ArgumentParser()
    for name, default in (("batch", 4), ("seq", 64), ("steps", 10), ("warmup", 3),
                          ("adapter_layers", 2), ("adapter_len", 10)):
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int, default=default)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    from peft import AdaptionPromptConfig, get_peft_model
    base, label = load_model(args)
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    peft_model = get_peft_model(copy.deepcopy(base), AdaptionPromptConfig(
        adapter_len=args.adapter_len, adapter_layers=args.adapter_layers, task_type="CAUSAL_LM"))
    gm = fxpeft.rewrite(copy.deepcopy(base), top_layers_rules(args.adapter_layers),
                        adapter_len=args.adapter_len)
    sides = {"fxpeft adaption prompt": step_fn(gm, ids), PEFT_SIDE: step_fn(peft_model, ids)}
    print(f"{label}: batch {args.batch} x seq {args.seq}, adapter_len {args.adapter_len}, "
          f"top {args.adapter_layers} layers, {args.steps} steps after {args.warmup} warm-up")
    print_ratios(interleaved_medians(sides, args.steps, args.warmup), PEFT_SIDE)


if __name__ == "__main__":
    main()
