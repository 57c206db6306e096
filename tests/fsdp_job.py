"""Run by tests/integration/test_fsdp.py under ``torchrun --nproc_per_node=2`` (gloo, CPU), and by the test
itself in one process: FSDP2's ``fully_shard`` on the whole adapted graph (one unit: the graph
reads the layers' parameters directly and calls no submodule FSDP could hook), AdamW steps on
this rank's half of each global batch, then ``fxpeft.save`` on every rank (it gathers the
sharded adapter; rank 0 writes). Writes ``<output>/rank<r>.json`` with the losses and what FSDP
did to the parameters."""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import fxpeft
from conftest import tiny_llama, token_batch

STEPS, BATCH, SEQ = 6, 4, 16


def train(gm: torch.nn.Module, rank: int, world: int, steps: int = STEPS,
          optimizer: "torch.optim.Optimizer | None" = None) -> list[float]:
    """``steps`` AdamW steps; each rank takes its half of every global batch."""
    if optimizer is None:
        optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    blocks = token_batch(steps * BATCH, SEQ, seed=3).view(steps, BATCH, SEQ)
    losses = []
    for batch in blocks:
        rows = batch.chunk(world)[rank]  # equal halves: the averaged gradient is the global one
        loss = gm(input_ids=rows, labels=rows).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= world
        losses.append(loss.item())
    return losses


def main(output: Path) -> dict:
    output.mkdir(parents=True, exist_ok=True)
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    torch.manual_seed(0)
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv.toml", dropout=0.0).train()
    facts: dict = {"world": world}
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        dist.init_process_group("gloo")
        fully_shard(gm, mesh=init_device_mesh("cpu", (world,)))
        params = dict(gm.named_parameters())
        facts["sharded"] = sorted(type(p).__name__ for p in params.values())[0]
        facts["local_numel"] = sum(p.to_local().numel() for p in params.values())
        facts["numel"] = sum(p.numel() for p in params.values())
    facts["losses"] = train(gm, rank, world)
    fxpeft.save(gm, output / "adapter")  # every rank: the gather is a collective
    (output / f"rank{rank}.json").write_text(json.dumps(facts))
    if world > 1:
        dist.destroy_process_group()
    return facts


if __name__ == "__main__":
    main(Path(sys.argv[1]))
