"""Fine-tune SmolLM2-135M with LoRA on several processes with FSDP2, layer by layer, and compare
per-rank memory with DDP and with whole-graph FSDP.

    torchrun --standalone --nproc_per_node=2 examples/fsdp_smollm2.py   # gloo on CPU, nccl on GPUs

Each mode trains a fresh adapted graph on the same global batches (each rank its half):

- ``ddp``: every rank holds the whole model; DDP all-reduces the adapters' gradients;
- ``whole``: ``fully_shard`` on the whole graph: one FSDP unit, so each step gathers every
  parameter at once (the graph reads them directly and calls no layer module);
- ``layers``: ``shard_layers`` (``fxpeft.layer_units``, then ``fully_shard`` on each layer and on
  the graph): FSDP gathers one layer's weights just before the layer runs and frees them after,
  forward and backward.

Per rank and mode it prints the parameter bytes held at rest, the peak of gathered parameters
during a step (counted at FSDP's gathers and frees: ``GatheredBytes``), their sum, the peak
allocated memory where the device keeps statistics (CUDA) or the peak resident set (CPU), and
the mean step time. ``--bf16-base``: a bf16 base with fp32 adapters (one FSDP unit holds both:
FSDP2 needs one dtype only among the parameters that train). On one GPU,
``torchrun --nproc_per_node=1 examples/fsdp_smollm2.py --tiny --bf16-base`` checks device
placement and mixed precision on nccl with world size 1. Rank 0 saves the per-layer run's adapter (PEFT format). ``--tiny``: a small
random Llama and random tokens (tests); ``--config``: a model of that shape, random weights
(the benchmark, bench/fsdp_memory.py); ``--report``: the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import fxpeft
from fxpeft.helpers.data import shakespeare_text, token_blocks
from fxpeft.helpers.memory import peak_rss_mib, release_freed_memory, reset_peak_rss
from fxpeft.helpers.models import load_smollm2
from fxpeft.helpers.sharding import GatheredBytes, shard_layers

MODES = ("ddp", "whole", "layers")
MIB = 2 ** 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", default=",".join(MODES), help="some of ddp,whole,layers")
    parser.add_argument("--rules", default="lora_qv.toml")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4, help="global: split over the ranks")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--output", default="out/smollm2-shakespeare-fsdp")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="a small random Llama, random tokens")
    parser.add_argument("--config", default=None, help="a model config (JSON): that shape, random weights")
    parser.add_argument("--bf16-base", action="store_true",
                        help="the base in bf16, the adapters in fp32 (PEFT's mixed precision)")
    parser.add_argument("--report", default=None, help="write the numbers here (JSON)")
    return parser.parse_args(argv)


def setup() -> tuple[int, int, torch.device]:
    """(rank, world size, device); the process group (nccl on GPUs, gloo on the CPU)."""
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():  # a test job may have joined it already
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def base_and_blocks(args: argparse.Namespace) -> tuple[Callable[[], torch.nn.Module], torch.Tensor]:
    """A maker of the base model (the same weights every call) and the token blocks."""
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM
    if args.tiny or args.config:
        config = AutoConfig.from_pretrained(args.config) if args.config else LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
        generator = torch.Generator().manual_seed(args.seed)
        blocks = torch.randint(2, config.vocab_size, (64, args.seq_len), generator=generator)
        def make() -> torch.nn.Module:
            torch.manual_seed(args.seed)
            return LlamaForCausalLM(config).eval()
        return make, blocks
    model, tokenizer = load_smollm2()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    def make_real() -> torch.nn.Module:
        model.load_state_dict(state)  # each mode starts from the pretrained weights
        return model
    return make_real, token_blocks(tokenizer, shakespeare_text("hamlet"), args.seq_len)


def wrap(mode: str, gm: torch.nn.Module, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(what to call, what holds the parameters) for ``mode``."""
    if mode == "ddp":
        return DistributedDataParallel(gm, device_ids=[device] if device.type == "cuda" else None), gm
    if mode == "whole":
        from torch.distributed.fsdp import fully_shard
        fully_shard(gm)
        return gm, gm
    sharded = shard_layers(gm)
    return sharded, sharded


def resident_bytes(model: torch.nn.Module) -> int:
    """The parameter bytes this rank holds at rest (its shards, for FSDP)."""
    local = (p.to_local() if hasattr(p, "to_local") else p for p in model.parameters())
    return sum(t.numel() * t.element_size() for t in local)


def run_mode(mode: str, make: Callable[[], torch.nn.Module], blocks: torch.Tensor,
             args: argparse.Namespace, rank: int, world: int, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(args.seed)  # the same adapter initialisation on every rank and mode
    base = make().to(torch.bfloat16) if args.bf16_base else make()
    gm = fxpeft.rewrite(base, args.rules, dropout=0.0).to(device).train()
    model, holder = wrap(mode, gm, device)
    optimizer = torch.optim.AdamW([p for p in holder.parameters() if p.requires_grad], lr=args.lr)
    counter = GatheredBytes(holder)
    generator = torch.Generator().manual_seed(args.seed)  # the same global batches everywhere
    release_freed_memory()
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, times = [], []
    with counter.counting():
        for _ in range(args.steps):
            batch = blocks[torch.randint(len(blocks), (args.batch_size,), generator=generator)]
            rows = batch.chunk(world)[rank].to(device)
            start = time.perf_counter()
            loss = model(input_ids=rows, labels=rows).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            losses.append(loss.item() / world)
    facts = {"mode": mode, "losses": losses, "resident_mib": resident_bytes(holder) / MIB,
             "gathered_peak_mib": counter.peak / MIB, "step_s": sum(times[1:]) / max(len(times) - 1, 1)}
    facts["params_peak_mib"] = facts["resident_mib"] + facts["gathered_peak_mib"]
    facts["device_peak_mib"] = (torch.cuda.max_memory_allocated(device) / MIB if device.type == "cuda"
                                else peak_rss_mib())
    if mode == "layers":
        fxpeft.save(holder, args.output)  # every rank gathers; rank 0 writes
    return facts


def table(rows: list[dict[str, Any]], device: torch.device) -> str:
    peak = "peak allocated" if device.type == "cuda" else "peak RSS"
    lines = [f"| mode | params at rest (MiB) | gathered peak (MiB) | params peak (MiB) | {peak} (MiB) | step (s) |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['mode']} | {r['resident_mib']:.1f} | {r['gathered_peak_mib']:.1f} | "
              f"{r['params_peak_mib']:.1f} | {r['device_peak_mib']:.0f} | {r['step_s']:.3f} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    rank, world, device = setup()
    make, blocks = base_and_blocks(args)
    rows = []
    for mode in args.modes.split(","):
        rows.append(run_mode(mode, make, blocks, args, rank, world, device))
        if rank == 0:
            print(f"{mode:6s} losses {' '.join(f'{x:.4f}' for x in rows[-1]['losses'])}", flush=True)
    every_rank: list[Any] = [None] * world
    dist.all_gather_object(every_rank, rows)
    if rank == 0:
        for r, its_rows in enumerate(every_rank):
            print(f"rank {r} ({world} processes, {device.type}):\n{table(its_rows, device)}")
        if args.report:
            Path(args.report).write_text(json.dumps({"world_size": world, "device": device.type,
                                                     "ranks": every_rank}, indent=2))
    dist.barrier()
    dist.destroy_process_group()
    return rows


if __name__ == "__main__":
    main()
