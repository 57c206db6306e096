"""One-process check of FSDP2 layer by layer (world size 1): a bf16 base with fp32 LoRA
adapters, sharded by ``shard_layers`` with a ``MixedPrecisionPolicy``, then through
accelerate's FSDP2 plugin (``accelerate_prepare``). Prints where every parameter lives (device,
dtype, sharded or not, trainable) and one step's loss against the unsharded graph's; exits 1
when a parameter is off the device, a dtype is not PEFT's convention, or a loss differs.

    torchrun --standalone --nproc_per_node=1 bench/fsdp_check.py --device cuda --backend nccl
    python bench/fsdp_check.py --device cpu --backend gloo      # the same, without torchrun

bench/gpu.sh runs the first line (its ``fsdp`` section); the tests run the second.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch
import torch.distributed as dist

import fxpeft
from fxpeft.helpers.sharding import accelerate_prepare, shard_layers

SMALL = {"hidden_size": 64, "intermediate_size": 128, "vocab_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2}


def _process_group(backend: str, device: str) -> None:
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if "RANK" in os.environ:  # torchrun
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def _graph(device: str) -> torch.nn.Module:
    """The same bf16 base with LoRA (q, v) on ``device`` each call; adapters fp32 (PEFT's
    ``autocast_adapter_dtype``)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMALL)).to(device=device, dtype=torch.bfloat16)
    torch.manual_seed(1)
    gm = fxpeft.rewrite(model, "lora_qv.toml", dropout=0.0).train()
    with torch.no_grad():  # B away from zero, so the adapters change the loss
        for name, tensor in fxpeft.adapter_state_dict(gm).items():
            if "lora_B" in name:
                tensor.normal_(0, 0.05)
    return gm


def _placement(gm: torch.nn.Module, device: str) -> list[str]:
    """One line per parameter; the problems found (off the device, a dtype against PEFT's)."""
    problems = []
    for name, p in gm.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        want = torch.float32 if p.requires_grad else torch.bfloat16
        print(f"  {name:60s} {type(p).__name__:8s} {str(local.device):8s} {str(p.dtype):15s} "
              f"local {list(local.shape)} of {list(p.shape)} {'trainable' if p.requires_grad else 'frozen'}")
        if local.device.type != device:
            problems.append(f"{name} on {local.device}")
        if p.dtype != want:
            problems.append(f"{name} is {p.dtype}, expected {want}")
    return problems


def _step(gm: torch.nn.Module, optimizer: Any, rows: torch.Tensor, backward: Any = None) -> float:
    loss = gm(input_ids=rows, labels=rows).loss
    (backward or torch.Tensor.backward)(loss)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def _adamw(gm: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2)


def _accelerate_loss(device: str, rows: torch.Tensor) -> float | None:
    """One step through accelerate's FSDP2 plugin and ``accelerate_prepare``; None without accelerate."""
    try:
        from accelerate import Accelerator, FullyShardedDataParallelPlugin
    except ImportError:
        print("accelerate: not installed, skipped")
        return None
    accelerator = Accelerator(cpu=device == "cpu", fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))
    gm = _graph(device)
    model, optimizer = accelerate_prepare(accelerator, gm, _adamw(gm))
    print(f"accelerate: {accelerator.distributed_type}, prepared {type(model).__name__}")
    return _step(model, optimizer, rows, accelerator.backward)


def check(device: str) -> list[str]:
    """Every check; returns the problems (none: it passed)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    rows = torch.randint(0, SMALL["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(2)).to(device)
    flat = _graph(device)
    flat_losses = [_step(flat, _adamw(flat), rows) for _ in range(1)]
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)  # fp32 gradient reduction; no cast
    sharded = shard_layers(_graph(device), mp_policy=policy)
    print(f"device {device}, world size {dist.get_world_size()}, backend {dist.get_backend()}, {policy}")
    problems = _placement(sharded, device)
    losses = {"unsharded": flat_losses[0], "shard_layers": _step(sharded, _adamw(sharded), rows)}
    via_accelerate = _accelerate_loss(device, rows)
    if via_accelerate is not None:
        losses["accelerate FSDP2 plugin"] = via_accelerate
    for name, loss in losses.items():
        print(f"one step's loss, {name}: {loss!r}")
        if abs(loss - flat_losses[0]) > 1e-5 * abs(flat_losses[0]):
            problems.append(f"{name} loss {loss!r} != unsharded {flat_losses[0]!r}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--backend", default=None, help="nccl (cuda) or gloo (cpu) when not given")
    args = parser.parse_args(argv)
    _process_group(args.backend or ("nccl" if args.device == "cuda" else "gloo"), args.device)
    try:
        problems = check(args.device)
    finally:
        dist.destroy_process_group()
    print("FSDP CHECK:", "PASS" if not problems else "FAIL: " + "; ".join(problems))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
