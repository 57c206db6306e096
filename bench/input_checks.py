"""What the input checks at the door cost (``fxpeft.runtime.input_checks``, issue 24 item 3): a
training step of the tiny Llama of DESIGN.md (hidden 256, 4 layers, batch 8 x 128) with the
checks and without them (the pre-hook taken off), sides interleaved step by step in one run,
medians after a warm-up; and the hook's own time per call, measured alone, as a fraction of
the step.

    python bench/input_checks.py [--steps 20] [--batch 8] [--seq 128]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved_medians, print_ratios  # noqa: E402

import fxpeft  # noqa: E402
from fxpeft.runtime import input_checks  # noqa: E402


def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                        num_attention_heads=4, vocab_size=32000)).train()


@contextlib.contextmanager
def without_checks(gm: torch.nn.Module):
    """``gm`` with the input-check pre-hook taken off (and put back after)."""
    hooks = gm._forward_pre_hooks
    key = next(k for k, hook in hooks.items() if hook is input_checks.check_inputs)
    hook, kwargs_flag = hooks.pop(key), gm._forward_pre_hooks_with_kwargs.pop(key, None)
    try:
        yield
    finally:
        hooks[key] = hook
        if kwargs_flag is not None:
            gm._forward_pre_hooks_with_kwargs[key] = kwargs_flag


def hook_seconds(gm: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, calls: int = 2000) -> float:
    """Median seconds of one ``check_inputs`` call, in rounds of 100."""
    rounds = []
    for _ in range(calls // 100):
        start = time.perf_counter()
        for _ in range(100):
            input_checks.check_inputs(gm, (), {"input_ids": ids, "attention_mask": mask, "labels": ids})
        rounds.append((time.perf_counter() - start) / 100)
    return statistics.median(rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv.toml")
    ids = torch.randint(0, 32000, (args.batch, args.seq))
    mask = torch.ones_like(ids)
    optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        gm(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    def step_unchecked() -> None:
        with without_checks(gm):
            step()

    medians = interleaved_medians({"with checks": step, "without checks": step_unchecked},
                                  steps=args.steps, warmup=3)
    print_ratios(medians, "without checks")
    hook = hook_seconds(gm, ids, mask)
    print(f"the hook alone: {hook * 1e6:.1f} us per call = {100 * hook / medians['without checks']:.4f}% "
          f"of a step (value check on: ids on the CPU)")


if __name__ == "__main__":
    main()
