"""Run by tests/integration/test_fsdp_layers.py under ``torchrun --nproc_per_node=2`` (gloo, CPU),
and by the test itself in one process (``reference``). Three setups in one spawn:

- ``layers``: ``shard_layers`` (``fxpeft.layer_units``, ``fully_shard`` per layer and on the
  graph) on a 4-layer tiny Llama with LoRA, AdamW on this rank's half of each global batch,
  gathered bytes counted at FSDP's gathers and frees; then ``fxpeft.save`` (gathers) and
  ``restore`` of that folder into a fresh sharded graph (scatters);
- ``whole``: ``fully_shard`` on the whole graph, the same count over one step;
- ``bf16``: the base in bf16, the adapters in fp32, sharded per layer;
- ``qlora``: an nf4 base (``bnb_4bit_quant_storage=bfloat16``, bitsandbytes' FSDP recipe: the
  packed weight is a bf16 parameter FSDP can shard and gather byte for byte; its ``absmax`` is a
  buffer, which FSDP keeps whole on every rank) with LoRA, sharded per layer;
- ``examples/fsdp_smollm2.py --tiny`` last (it leaves the process group), its report in
  ``<output>/example.json``;
- ``trainer``: ``fxpeft.Trainer`` with FSDP2 arguments (which accelerate ignores on the CPU)
  on the flat graph and on a sharded one: what each refusal says.

Writes ``<output>/rank<r>.json``. Arguments: the output folder, a saved tiny Llama (for QLoRA).
"""

import importlib.util
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import fxpeft
from conftest import tiny_llama
from fsdp_job import train
from fxpeft.helpers.sharding import GatheredBytes, shard_layers
from fxpeft.transforms.units import layer_modules
from fxpeft.io.serialize import restore

LAYERS = 4
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fsdp_smollm2.py"
QLORA_STEPS = 3


def adapted(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return fxpeft.rewrite(tiny_llama(num_hidden_layers=LAYERS).to(dtype), "lora_qv.toml",
                          dropout=0.0).train()


def reference(output: Path) -> dict:
    """The flat graph in one process, the whole global batch per step."""
    gm = adapted()
    facts = {"losses": train(gm, 0, 1)}
    fxpeft.save(gm, output / "adapter")
    return facts


def _local_fraction(module: torch.nn.Module, frozen: bool) -> float:
    """This rank's share of ``module``'s own (frozen or trainable) parameter numbers."""
    params = [p for p in module.parameters() if p.requires_grad != frozen]
    return sum(p.to_local().numel() for p in params) / sum(p.numel() for p in params)


def _bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.dtype.itemsize for p in module.parameters())


def _optimizer_facts(optimizer: torch.optim.Optimizer, gm: torch.nn.Module) -> dict:
    states = [s for s in optimizer.state.values() if "exp_avg" in s]
    adapters = [p for p in gm.parameters() if p.requires_grad]
    return {"state_tensors": len(states), "adapter_tensors": len(adapters),
            "state_local_numel": sum(s["exp_avg"].to_local().numel() for s in states),
            "adapter_numel": sum(p.numel() for p in adapters),
            "state_sharded": all(type(s["exp_avg"]).__name__ == "DTensor" for s in states)}


def per_layer(output: Path, rank: int, world: int) -> dict:
    gm = shard_layers(adapted())
    layers = layer_modules(gm)
    facts = {"units": len(layers),
             "base_fraction": [_local_fraction(m, frozen=True) for m in layers],
             "adapter_fraction": [_local_fraction(m, frozen=False) for m in layers],
             "layer_bytes": [_bytes(m) for m in layers],
             "trainable": sorted(n for n, p in gm.named_parameters() if p.requires_grad)}
    facts["root_bytes"] = _bytes(gm) - sum(facts["layer_bytes"])
    optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    counter = GatheredBytes(gm)
    with counter.counting():
        facts["losses"] = train(gm, rank, world, optimizer=optimizer)
    facts.update(peak=counter.peak, total=counter.total, optimizer=_optimizer_facts(optimizer, gm))
    fxpeft.save(gm, output / "adapter")
    fresh = shard_layers(adapted())
    restore(fresh, output / "adapter")
    trained, restored = fxpeft.adapter_state_dict(gm), fxpeft.adapter_state_dict(fresh)
    facts["restored_equal"] = all(torch.equal(trained[k].full_tensor(), restored[k].full_tensor())
                                  for k in trained)
    return facts


def whole_graph(rank: int, world: int) -> dict:
    from torch.distributed.fsdp import fully_shard
    gm = adapted()
    fully_shard(gm)
    counter = GatheredBytes(gm)
    with counter.counting():
        train(gm, rank, world, steps=1)
    return {"peak": counter.peak, "total": counter.total}


def bf16_base(rank: int, world: int) -> dict:
    gm = adapted(torch.bfloat16)
    dtypes = {n: str(p.dtype) for n, p in gm.named_parameters()}
    gm = shard_layers(gm)
    counter = GatheredBytes(gm)
    with counter.counting():
        losses = train(gm, rank, world, steps=2)
    return {"dtypes": dtypes, "losses": losses, "peak": counter.peak, "total": counter.total,
            "after": {n: str(p.dtype) for n, p in gm.named_parameters()}}


def qlora_graph(checkpoint: Path) -> torch.nn.Module:
    from transformers import BitsAndBytesConfig, LlamaForCausalLM
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_compute_dtype=torch.float32,
                                bnb_4bit_quant_storage=torch.bfloat16)
    model = LlamaForCausalLM.from_pretrained(checkpoint, quantization_config=config, device_map="cpu")
    torch.manual_seed(0)
    return fxpeft.rewrite(model, "lora_qv.toml", dropout=0.0).train()


def qlora_reference(checkpoint: Path) -> dict:
    """The unsharded QLoRA graph in one process, the whole global batch per step."""
    gm = qlora_graph(checkpoint)
    return {"losses": train(gm, 0, 1, steps=QLORA_STEPS),
            "adapter": {k: v.tolist() for k, v in fxpeft.adapter_state_dict(gm).items()}}


def qlora(checkpoint: Path, rank: int, world: int) -> dict:
    gm = shard_layers(qlora_graph(checkpoint))
    packed = gm.get_parameter("model.layers.0.self_attn.q_proj.weight")
    facts = {"packed": [type(packed).__name__, str(packed.dtype), packed.to_local().numel(), packed.numel()],
             "losses": train(gm, rank, world, steps=QLORA_STEPS)}
    facts["adapter"] = {k: v.full_tensor().tolist() for k, v in fxpeft.adapter_state_dict(gm).items()}
    return facts


def trainer_routes(output: Path) -> dict:
    from transformers import TrainingArguments
    args = TrainingArguments(output_dir=str(output / "trainer"), max_steps=1, report_to=[],
                             use_cpu=True, fsdp="full_shard", fsdp_config={"fsdp_version": 2})
    refusals = {}
    for name, graph in (("flat", adapted()), ("sharded", shard_layers(adapted()))):
        try:
            fxpeft.Trainer(model=graph, args=args, train_dataset=[])
        except fxpeft.FxpeftError as err:
            refusals[name] = str(err)
    return refusals


def main(output: Path, checkpoint: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    try:
        facts = {"layers": per_layer(output, rank, world), "whole": whole_graph(rank, world),
                 "bf16": bf16_base(rank, world), "trainer": trainer_routes(output),
                 "qlora": qlora(checkpoint, rank, world)}
        (output / f"rank{rank}.json").write_text(json.dumps(facts))
        run_example(output)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_example(output: Path) -> None:
    spec = importlib.util.spec_from_file_location("fsdp_smollm2", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--tiny", "--steps", "3", "--seq-len", "16", "--output", str(output / "example"),
                  "--report", str(output / "example.json")])


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
