"""Decoding speed: fxpeft.generate (static KV cache) against PEFT's generate (static and dynamic
cache) and against a loop without a cache, on the real SmolLM2-135M with LoRA q,v; sides
interleaved, medians after warm-up, ratios from this run only.

    python bench/generate.py [--prompt 128 --new 16 --batch 1 --steps 3] [--per-step]

Per-token decode time of a side = the median over rounds of (time to generate ``new`` tokens -
time to generate 1 token, both in the same round) / (new - 1): the prefill cancels out, and
pairing within a round keeps the machine's drift between rounds out of the difference. The
no-cache loop runs the whole sequence through the adapted graph for every token, as a
hand-written loop had to before ``fxpeft.generate``. It also checks that the greedy tokens equal
PEFT's. ``--per-step`` times one decoding step in isolation instead (less noisy on a loaded
machine): the decode graph, PEFT's model on a ``StaticCache`` of the same length, and a no-cache
forward over prompt + 1 tokens.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved_medians, interleaved_times, machine_line  # noqa: E402

import fxpeft  # noqa: E402
from fxpeft.generation.decode_graph import decoder_for  # noqa: E402
from fxpeft.graph.state import graph_state  # noqa: E402
from fxpeft.helpers.models import load_smollm2  # noqa: E402


def adapted(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """fxpeft's LoRA q,v graph (B randomised, so the adapter matters) and PEFT's twin of it."""
    from peft import PeftModel
    gm = fxpeft.rewrite(model, "lora_qv.toml")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    folder = Path(tempfile.mkdtemp()) / "adapter"
    fxpeft.save(gm, folder)
    return gm.eval(), PeftModel.from_pretrained(copy.deepcopy(model), folder).eval()


def no_cache_loop(gm: torch.nn.Module, ids: torch.Tensor, new: int) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(new):
            ids = torch.cat([ids, gm(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def sides(gm: torch.nn.Module, peft_model: torch.nn.Module, ids: torch.Tensor, new: int) -> dict:
    def ours(n: int):
        return lambda: fxpeft.generate(gm, ids, max_new_tokens=n, eos_token_id=[])

    def peft(n: int, cache: str | None):
        return lambda: peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                           max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                           cache_implementation=cache)

    runs = {"fxpeft": ours, "peft static": lambda n: peft(n, "static"),
            "peft dynamic": lambda n: peft(n, None),
            "no cache": lambda n: (lambda: no_cache_loop(gm, ids, n))}
    return {f"{name} {n}": make(n) for name, make in runs.items() for n in (1, new)}


def step_sides(gm: torch.nn.Module, peft_model: torch.nn.Module, ids: torch.Tensor, new: int) -> dict:
    """One decoding step each, at position ``prompt`` after a prefill (the caches are rewound
    before every step): fxpeft's decode graph, PEFT's model on a StaticCache, and the no-cache
    forward over the whole sequence."""
    from transformers import StaticCache
    batch, prompt = ids.shape
    decoder = decoder_for(gm, batch, prompt + new)
    token = ids[:, -1:]
    mask = torch.zeros(batch, graph_state(decoder).cache_length, dtype=torch.long)
    mask[:, :prompt + 1] = 1
    cache = StaticCache(config=peft_model.config, max_cache_len=prompt + new)
    peft_model(input_ids=ids, cache=cache, use_cache=True)
    full = torch.cat([ids, token], dim=1)

    def peft_step() -> None:
        for layer in cache.layers:
            layer.cumulative_length.fill_(prompt)
        peft_model(input_ids=token, attention_mask=torch.ones_like(full), cache=cache, use_cache=True)
    return {"fxpeft": lambda: decoder(token, mask, torch.full((batch, 1), prompt), torch.tensor([prompt])),
            "peft static": peft_step, "no cache": lambda: gm(full)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--per-step", action="store_true", help="time single decoding steps instead")
    args = parser.parse_args()
    model, _ = load_smollm2()
    gm, peft_model = adapted(model)
    ids = torch.randint(10, 10000, (args.batch, args.prompt), generator=torch.Generator().manual_seed(1))
    ours = fxpeft.generate(gm, ids, max_new_tokens=args.new, eos_token_id=[])
    theirs = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                                 min_new_tokens=args.new, do_sample=False)
    print(f"SmolLM2-135M, LoRA q,v, batch {args.batch}, prompt {args.prompt}, {args.new} new tokens")
    print(f"greedy tokens equal to PEFT generate: {torch.equal(ours, theirs)}")
    if args.per_step:
        with torch.no_grad():
            medians = interleaved_medians(step_sides(gm, peft_model, ids, args.new), args.steps, warmup=2)
        print(machine_line())
        for name, seconds in medians.items():
            print(f"{name:<14} {seconds * 1000:8.2f} ms/step   {seconds / medians['fxpeft']:.3f} x fxpeft")
        print(f"fxpeft / no-cache step   {medians['fxpeft'] / medians['no cache']:.3f}")
        print(f"fxpeft / PEFT static     {medians['fxpeft'] / medians['peft static']:.3f}")
        return
    with torch.no_grad():
        times = interleaved_times(sides(gm, peft_model, ids, args.new), args.steps, warmup=1)
    medians = {name: statistics.median(values) for name, values in times.items()}
    per_token = {name: statistics.median((long - short) / (args.new - 1) for long, short in
                                         zip(times[f"{name} {args.new}"], times[f"{name} 1"]))
                 for name in ("fxpeft", "peft static", "peft dynamic", "no cache")}
    print(machine_line())
    for name, seconds in per_token.items():
        print(f"{name:<14} {seconds * 1000:8.2f} ms/token   prefill+1 {medians[f'{name} 1'] * 1000:8.1f} ms")
    print(f"fxpeft / no-cache loop   {per_token['fxpeft'] / per_token['no cache']:.3f}")
    print(f"fxpeft / PEFT static     {per_token['fxpeft'] / per_token['peft static']:.3f}")
    print(f"fxpeft / PEFT dynamic    {per_token['fxpeft'] / per_token['peft dynamic']:.3f}")


if __name__ == "__main__":
    main()
