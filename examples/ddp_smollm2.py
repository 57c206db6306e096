"""Fine-tune SmolLM2-135M with LoRA on several processes with DistributedDataParallel.

    torchrun --standalone --nproc_per_node=2 examples/ddp_smollm2.py   # gloo on CPU, nccl on GPUs
    python examples/ddp_smollm2.py                                     # one process, same batches

Every rank captures the same adapted graph and wraps it in ``DistributedDataParallel``. DDP
registers only parameters that require grad, so only the adapters' gradients are all-reduced
(the frozen base weights are never communicated after the start-up broadcast). Each step draws
one global batch, the same on every rank, and each rank trains on its slice, so N processes
compute what one process does with the whole batch (``python examples/ddp_smollm2.py``), to
float rounding. ``--dropout 0`` (the default here) keeps it that way: with dropout, ranks
draw other masks than a single process would. Rank 0 prints held-out perplexity before and
after, checks that every rank ends with the same adapter, and saves it in PEFT's format.
``--tiny`` swaps in a small random Llama and random tokens (for tests); ``--report`` writes the
numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import fxpeft
from fxpeft.helpers.data import perplexity, shakespeare_text, token_blocks
from fxpeft.helpers.models import load_smollm2
from fxpeft.io.serialize import tensor_digest


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--play", default="hamlet")
    parser.add_argument("--rules", default="lora_qv.toml")
    parser.add_argument("--dropout", type=float, default=0.0, help="adapter dropout (rule override)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8, help="global: split over the ranks")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-blocks", type=int, default=8)
    parser.add_argument("--output", default="out/smollm2-shakespeare-ddp")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="a small random Llama, random tokens")
    parser.add_argument("--report", default=None, help="write losses and DDP facts here (JSON)")
    return parser.parse_args(argv)


def setup() -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the process group when launched by torchrun."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cpu")
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def tiny_model_and_blocks(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor]:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(args.seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                         max_position_embeddings=256)
    generator = torch.Generator().manual_seed(args.seed)
    blocks = torch.randint(2, config.vocab_size, (64, args.seq_len), generator=generator)
    return LlamaForCausalLM(config).eval(), blocks


def model_and_blocks(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor]:
    if args.tiny:
        return tiny_model_and_blocks(args)
    model, tokenizer = load_smollm2()
    return model, token_blocks(tokenizer, shakespeare_text(args.play), args.seq_len)


def my_rows(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous slice of the global batch (equal slices: DDP averages gradients,
    so every rank must hold as many target tokens for the average to be the global mean)."""
    if len(batch) % world:
        raise SystemExit(f"--batch-size {len(batch)} does not split evenly over {world} processes")
    size = len(batch) // world
    return batch[rank * size:(rank + 1) * size]


def reducer_facts(model: torch.nn.Module, gm: torch.nn.Module) -> dict[str, Any]:
    """What DDP all-reduces (its logging data), next to the adapters' own count and size."""
    adapters = [p for p in gm.parameters() if p.requires_grad]
    facts = {"adapter_tensors": len(adapters),
             "adapter_bytes": sum(p.numel() * p.element_size() for p in adapters),
             "all_tensors": len(list(gm.parameters()))}
    if isinstance(model, DistributedDataParallel):
        data = model._get_ddp_logging_data()  # DDP's own record of its reducer
        facts.update(reduced_tensors=data["num_parameter_tensors"],
                     reduced_bytes=data["total_parameter_size_bytes"],
                     bucket_sizes=[int(s) for s in str(data["bucket_sizes"]).split(",") if s.strip()])
    return facts


def train(gm: torch.nn.Module, blocks: torch.Tensor, args: argparse.Namespace, rank: int,
          world: int, device: torch.device) -> tuple[list[float], dict[str, Any]]:
    """``args.steps`` AdamW steps; the global mean loss of each, and what DDP reduces."""
    model = DistributedDataParallel(gm, device_ids=[device] if device.type == "cuda" else None) \
        if world > 1 else gm
    optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)  # the same global batches on every rank
    gm.train()
    losses = []
    for step in range(args.steps):
        batch = blocks[torch.randint(len(blocks), (args.batch_size,), generator=generator)]
        rows = my_rows(batch, rank, world).to(device)
        loss = model(input_ids=rows, labels=rows).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(global_mean(loss.detach(), world))
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {losses[-1]:.4f}", flush=True)
    return losses, reducer_facts(model, gm)


def global_mean(value: torch.Tensor, world: int) -> float:
    if world > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= world
    return value.item()


def adapter_digests(gm: torch.nn.Module, world: int) -> list[str]:
    """Every rank's adapter digest (key, dtype, shape and bytes of each tensor), rank order."""
    mine = tensor_digest({k: v.cpu() for k, v in fxpeft.adapter_state_dict(gm).items()})
    if world == 1:
        return [mine]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    return gathered


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    rank, world, device = setup()
    start = time.perf_counter()
    torch.manual_seed(args.seed)  # the same adapter initialisation on every rank
    model, blocks = model_and_blocks(args)
    held_out, train_blocks = blocks[: args.eval_blocks], blocks[args.eval_blocks:]
    gm = fxpeft.rewrite(model, args.rules, dropout=args.dropout).to(device)
    if rank == 0:
        print(f"{world} process(es), global batch {args.batch_size} x {args.seq_len}, "
              f"{len(train_blocks)} training blocks")
        fxpeft.trainable_parameters(gm, print_line=True)
        before = perplexity(gm, held_out.to(device), args.batch_size)
        print(f"held-out perplexity before: {before:.2f}", flush=True)
    losses, facts = train(gm, train_blocks, args, rank, world, device)
    digests = adapter_digests(gm, world)
    report = {"world_size": world, "losses": losses, "ddp": facts, "adapter_digests": digests}
    if rank == 0:
        after = perplexity(gm, held_out.to(device), args.batch_size)
        print(f"held-out perplexity after:  {after:.2f}")
        print(f"DDP all-reduces {facts.get('reduced_tensors', 0)} tensors: the "
              f"{facts['adapter_tensors']} adapter tensors of {facts['all_tensors']}")
        if len(set(digests)) != 1:
            raise SystemExit(f"ranks ended with different adapters: {digests}")
        folder = fxpeft.save(gm, args.output)
        report["seconds"] = time.perf_counter() - start
        print(f"every rank holds the same adapter; saved to {folder} "
              f"({report['seconds']:.0f} s in all)")
        if args.report:
            Path(args.report).write_text(json.dumps(report, indent=2))
    if world > 1:
        dist.barrier()  # rank 0's files are complete before any process exits
        dist.destroy_process_group()
    return report


if __name__ == "__main__":
    main()
