"""Serving many LoRA adapters in one batch: inference throughput with 1, 8, 64 and 256 adapters
loaded, each batch's samples drawing their adapters at random from all that are loaded, fxpeft's
serving copy (``fxpeft.fuse(gm, mixed=True, slots=256)``, compiled once, adapters loaded into
its slots while it serves) against PEFT's ``adapter_names=`` on the same batches, and against
fxpeft's fused graph holding one adapter (compiled). Sides interleaved step by step, medians
after warm-up, ratios from this run only.

    python bench/serve.py [--layers 2 --hidden 576 --vocab 4096 --batch 64 --seq 64 --r 8]
                          [--counts 1,8,64,256 --steps 5 --threads 2 --profile]

Targets (CPU): at 256 adapters, fxpeft's serving copy <= 1.10x the one-adapter graph's time and
<= 0.8x PEFT's. ``--profile`` prints torch.profiler's top ops for each side at the largest count.
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))  # this checkout's fxpeft
from common import interleaved_medians, machine_line  # noqa: E402

import fxpeft  # noqa: E402


def llama(args: argparse.Namespace) -> torch.nn.Module:
    """A SmolLM2-shaped Llama (hidden 576, 9 heads, 3 KV heads, MLP 1536), few layers."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=9, num_key_value_heads=3,
                         vocab_size=args.vocab, max_position_embeddings=2048)
    return LlamaForCausalLM(config).eval()


def adapter_weights(gm: torch.nn.Module, count: int) -> list[dict[str, torch.Tensor]]:
    """``count`` random adapters: per LoRA parameter of ``gm``'s "default" (``...q_proj.lora_A
    .weight``), its values."""
    generator = torch.Generator().manual_seed(1)
    shapes = {name: p.shape for name, p in gm.named_parameters() if ".lora_" in name}
    return [{name: torch.randn(shape, generator=generator) * 0.05 for name, shape in shapes.items()}
            for _ in range(count)]


def load_fxpeft(served: torch.nn.Module, gm: torch.nn.Module, weights: list[dict], names: list[str]) -> None:
    """Write each adapter into ``gm``'s "default" and from there into a slot of ``served``."""
    params = dict(gm.named_parameters())
    for name, values in zip(names, weights):
        with torch.no_grad():
            for key, value in values.items():
                params[key].copy_(value)
        fxpeft.load_into_slot(served, gm, "default", name=name)


def peft_model(base: torch.nn.Module, r: int) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    return get_peft_model(base, config, adapter_name="a0").eval()


def load_peft(model: torch.nn.Module, weights: list[dict], names: list[str], first: bool) -> None:
    """Add each adapter (PEFT's ``add_adapter``) and give it the same values as fxpeft's."""
    for name in names:
        if not (first and name == "a0"):
            model.add_adapter(name, model.peft_config["a0"])
    params = dict(model.named_parameters())
    for name, values in zip(names, weights):
        with torch.no_grad():
            for key, value in values.items():
                module, component = key.rsplit(".lora_", 1)
                part, leaf = component.split(".", 1)
                params[f"base_model.model.{module}.lora_{part}.{name}.{leaf}"].copy_(value)
    model.eval()


def mixtures(names: list[str], batch: int, count: int, seed: int) -> list[list[str]]:
    """``count`` batches' per-sample adapters, each drawn at random from ``names``."""
    rng = random.Random(seed)
    return [[rng.choice(names) for _ in range(batch)] for _ in range(count)]


def cycling(model: torch.nn.Module, ids: torch.Tensor, batches: "list[list[str]] | None"):
    """One inference call per step, the next batch's adapters each time (None: no names)."""
    calls = iter(range(10 ** 9))

    def step() -> None:
        with torch.no_grad():
            if batches is None:
                model(input_ids=ids)
            else:
                model(input_ids=ids, adapter_names=batches[next(calls) % len(batches)])
    return step


def profile(sides: dict, rows: int = 12) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile
    for name, step in sides.items():
        step()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        print(f"\nprofile: {name}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("layers", 2), ("hidden", 576), ("vocab", 4096), ("batch", 64),
                          ("seq", 64), ("r", 8), ("steps", 5), ("threads", 2)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--counts", default="1,8,64,256")
    parser.add_argument("--profile", action="store_true")
    return parser.parse_args(argv)


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    counts = [int(c) for c in args.counts.split(",")]
    base = llama(args)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    print(f"Llama: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, batch {args.batch} x "
          f"{args.seq}, LoRA q,v r={args.r}\n{machine_line()}")
    gm = fxpeft.rewrite(copy.deepcopy(base), "lora_qv", dropout=0.0, r=args.r, alpha=2 * args.r).eval()
    weights = adapter_weights(gm, max(counts))
    names = [f"a{i}" for i in range(max(counts))]
    one = fxpeft.rewrite(copy.deepcopy(base), "lora_qv", dropout=0.0, r=args.r, alpha=2 * args.r).eval()
    with torch.no_grad():  # the one-adapter graph holds a0
        for key, value in weights[0].items():
            one.get_parameter(key).copy_(value)
    start = time.perf_counter()
    served = fxpeft.fuse(gm, mixed=True, slots=max(counts), slot_rank=args.r)
    fxpeft.unload_slot(served, "default")
    print(f"fxpeft serving copy with {max(counts)} slots built in {time.perf_counter() - start:.2f} s")
    peft = peft_model(copy.deepcopy(base), args.r)
    compiled = torch.compile(served)
    compiled_one = torch.compile(fxpeft.fuse(one))
    loaded = 0
    results = {}
    for count in counts:
        start = time.perf_counter()
        load_fxpeft(served, gm, weights[loaded:count], names[loaded:count])
        fx_load = time.perf_counter() - start
        start = time.perf_counter()
        load_peft(peft, weights[loaded:count], names[loaded:count], first=loaded == 0)
        peft_load = time.perf_counter() - start
        loaded = count
        batches = mixtures(names[:count], args.batch, 4, seed=count)
        sides = {"fxpeft slots, compiled": cycling(compiled, ids, batches),
                 "fxpeft slots, eager": cycling(served, ids, batches),
                 "PEFT adapter_names=": cycling(peft, ids, batches),
                 "fxpeft one adapter, compiled": cycling(compiled_one, ids, None)}
        medians = interleaved_medians(sides, args.steps, 1)
        results[count] = medians
        distinct = sum(len(set(b)) for b in batches) / len(batches)
        print(f"\n{count} adapters loaded ({distinct:.1f} distinct per batch on average); loading "
              f"them: fxpeft load_into_slot {fx_load:.2f} s, PEFT add_adapter {peft_load:.2f} s")
        for name, seconds in medians.items():
            print(f"  {name:<30} {seconds * 1000:8.1f} ms  {args.batch * args.seq / seconds:8.0f} tok/s")
        print(f"  fxpeft slots compiled / one adapter compiled: "
              f"{medians['fxpeft slots, compiled'] / medians['fxpeft one adapter, compiled']:.3f}   "
              f"/ PEFT: {medians['fxpeft slots, compiled'] / medians['PEFT adapter_names=']:.3f}   "
              f"eager slots / PEFT: {medians['fxpeft slots, eager'] / medians['PEFT adapter_names=']:.3f}")
        if args.profile and count == counts[-1]:
            profile(sides)
    print(f"\n{machine_line()}")
    print("| adapters | fxpeft slots compiled (ms) | / one adapter compiled | / PEFT | fxpeft eager / PEFT | PEFT (ms) |")
    print("|---|---|---|---|---|---|")
    for count, m in results.items():
        fx, peft_ms = m["fxpeft slots, compiled"], m["PEFT adapter_names="]
        print(f"| {count} | {fx * 1000:.0f} | {fx / m['fxpeft one adapter, compiled']:.3f} | "
              f"{fx / peft_ms:.3f} | {m['fxpeft slots, eager'] / peft_ms:.3f} | {peft_ms * 1000:.0f} |")


if __name__ == "__main__":
    main()
