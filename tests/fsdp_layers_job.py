"""Run by tests/integration/test_fsdp_layers.py under ``torchrun --nproc_per_node=2`` (gloo, CPU),
and by the test itself in one process (``reference``, ``qlora_reference``). Every 2-process
setup runs in this one spawn (each spawn costs tens of seconds on 2 cores):

- ``layers``: ``shard_layers`` (``fxpeft.layer_units``, ``fully_shard`` per layer and on the
  graph) on a 4-layer tiny Llama with LoRA, AdamW on this rank's half of each global batch,
  gathered bytes counted at FSDP's gathers and frees; then ``fxpeft.save`` (gathers) and
  ``restore`` of that folder into a fresh sharded graph (scatters), and ``fxpeft.load`` of it
  onto another (against ``fxpeft.load`` onto the unsharded base; a second adapter refused);
- ``whole``: ``fully_shard`` on the whole graph, the same count over one step;
- ``bf16``: the base in bf16, the adapters in fp32, sharded per layer;
- ``qlora``: an nf4 base (``bnb_4bit_quant_storage=bfloat16``, bitsandbytes' FSDP recipe: the
  packed weight is a bf16 parameter FSDP can shard and gather byte for byte; its ``absmax`` is a
  buffer, which FSDP keeps whole on every rank) with LoRA, sharded per layer;
- ``trainer``: ``fxpeft.Trainer`` (flat and sharded graph) and TRL's ``SFTTrainer`` with
  fxpeft's checkpoints, given FSDP2 arguments (which accelerate ignores on the CPU): what each
  refusal says (the sharded graph is accepted);
- ``resume``: fxpeft.Trainer's checkpoint methods on a sharded graph, resumed from step 2;
- ``trained``: ``fxpeft.Trainer.train()`` on a sharded graph (no DDP: FSDP2 syncs), 4 steps
  with checkpoints, then resumed from its step-2 checkpoint; TRL's SFTTrainer the same way,
  and on the flat graph under DDP;
- ``accelerate``: ``Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))``
  through ``fxpeft.helpers.sharding.accelerate_prepare``, ``save_state`` after step 2, resumed by
  ``load_state`` under accelerate's FSDP environment variables instead of the plugin;
- ``examples/fsdp_smollm2.py --tiny`` last (it leaves the process group), its report in
  ``<output>/example.json``.

Writes ``<output>/rank<r>.json``. Arguments: the output folder, a saved tiny Llama (for QLoRA).
"""

import contextlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import torch
import torch.distributed as dist
from safetensors.torch import load_file

import fxpeft
from conftest import tiny_llama, token_batch
from fsdp_job import train
from fxpeft.helpers.sharding import GatheredBytes, accelerate_prepare, shard_layers
from fxpeft.transforms.units import layer_modules
from fxpeft.io.serialize import restore
from fxpeft.tools.trainer import AdapterCheckpoints

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
    facts["load"] = load_onto_sharded(output / "adapter")
    return facts


def load_onto_sharded(folder: Path) -> dict:
    """``fxpeft.load`` of the saved folder onto a fresh sharded graph (each rank keeps its shard)
    against ``fxpeft.load`` onto the unsharded base; then a second adapter, refused."""
    rows = token_batch(2, 16, seed=9)
    torch.manual_seed(0)
    flat = fxpeft.load(tiny_llama(num_hidden_layers=LAYERS), folder)
    sharded = shard_layers(adapted())
    loaded = fxpeft.load(sharded, folder)
    shard = loaded.get_parameter("model.layers.0.self_attn.q_proj.lora_B.weight")
    facts = {"same_graph": loaded is sharded, "shard": [type(shard).__name__, shard.to_local().shape[0], shard.shape[0]],
             "frozen": not any(p.requires_grad for p in sharded.parameters()),
             "logits_equal": torch.equal(sharded.eval()(rows).logits, flat(rows).logits)}
    try:
        fxpeft.load(sharded, folder, adapter="second")
    except fxpeft.FxpeftError as err:
        facts["second"] = str(err)
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


class Checkpointer(AdapterCheckpoints):
    """fxpeft.Trainer's checkpoint methods on a sharded graph, without the Trainer around them
    (``save_model``, ``_save_optimizer_and_scheduler``, ``_load_from_checkpoint``,
    ``_load_optimizer_and_scheduler``, called directly), so the saved optimizer state can be
    read step by step; ``trainer_train`` runs them through ``train()``."""

    def __init__(self, model: torch.nn.Module, output: Path, rank: int) -> None:
        self.model = model
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1 / (1 + step))
        self.args = SimpleNamespace(should_save=rank == 0, output_dir=str(output))
        self.processing_class = None


def _steps(trainer: Checkpointer, blocks: torch.Tensor, rank: int, world: int) -> None:
    for batch in blocks:
        rows = batch.chunk(world)[rank]
        trainer.model(input_ids=rows, labels=rows).loss.backward()
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trainer.optimizer.zero_grad(set_to_none=True)


def checkpoint_resume(output: Path, rank: int, world: int) -> dict:
    """4 steps with a checkpoint after 2, against a fresh sharded graph resumed from it."""
    blocks = token_batch(4 * 4, 16, seed=5).view(4, 4, 16)
    folder = output / "checkpoint-2"
    run = Checkpointer(shard_layers(adapted()), output, rank)
    _steps(run, blocks[:2], rank, world)
    run.save_model(str(folder))
    run._save_optimizer_and_scheduler(str(folder))
    _steps(run, blocks[2:], rank, world)
    resumed = Checkpointer(shard_layers(adapted()), output, rank)
    resumed._load_from_checkpoint(str(folder))
    resumed._load_optimizer_and_scheduler(str(folder))
    _steps(resumed, blocks[2:], rank, world)
    whole = lambda gm: {k: v.full_tensor() for k, v in fxpeft.adapter_state_dict(gm).items()}  # noqa: E731
    trained, again = whole(run.model), whole(resumed.model)
    saved = torch.load(folder / "optimizer.pt", weights_only=True)["state"] if rank == 0 else {}
    shapes = {n: list(p.shape) for n, p in run.model.named_parameters() if p.requires_grad}
    return {"files": sorted(p.name for p in folder.iterdir()),
            "equal": all(torch.equal(trained[k], again[k]) for k in trained),
            "optimizer": {k: [type(v["exp_avg"]).__name__, list(v["exp_avg"].shape)] for k, v in saved.items()},
            "adapter_shapes": shapes}


def trainer_routes(output: Path) -> dict:
    """What fxpeft.Trainer (flat and sharded graph) and TRL's SFTTrainer with fxpeft's
    checkpoints (flat graph) say to FSDP2 arguments on the CPU."""
    import datasets
    import trl
    from transformers import TrainingArguments
    from conftest import word_texts, word_tokenizer
    fsdp = {"use_cpu": True, "report_to": [], "max_steps": 1, "fsdp": "full_shard",
            "fsdp_config": {"fsdp_version": 2}}
    args = TrainingArguments(output_dir=str(output / "trainer"), **fsdp)
    sft = fxpeft.with_adapter_checkpoints(trl.SFTTrainer)
    texts = datasets.Dataset.from_dict({"text": word_texts(4, words=12, seed=1)})
    makers = {"flat": lambda: fxpeft.Trainer(model=adapted(), args=args, train_dataset=[]),
              "sharded": lambda: fxpeft.Trainer(model=shard_layers(adapted()), args=args, train_dataset=[]),
              "sft": lambda: sft(model=adapted(), args=trl.SFTConfig(str(output / "sft"), **fsdp),
                                 train_dataset=texts, processing_class=word_tokenizer("right"))}
    refusals = {}
    for name, make in makers.items():
        try:
            make()
        except fxpeft.FxpeftError as err:
            refusals[name] = str(err)
    return refusals


TRAINER_STEPS = 4


def trainer_data() -> list[dict]:
    """16 rows: 4 global batches of 4, read in order (each rank its own half of each)."""
    return [{"input_ids": row, "labels": row} for row in token_batch(4 * TRAINER_STEPS, 16, seed=7)]


def trainer_args(output: Path, world: int, **extra: Any) -> Any:
    from transformers import TrainingArguments
    return TrainingArguments(output_dir=str(output), per_device_train_batch_size=4 // world,
                             max_steps=TRAINER_STEPS, save_steps=2, logging_steps=1, learning_rate=1e-2,
                             max_grad_norm=0.5, train_sampling_strategy="sequential", seed=0,
                             report_to=[], use_cpu=True, disable_tqdm=True, **extra)


def trainer_facts(trainer: Any, gm: torch.nn.Module) -> dict:
    """Logged losses (all ranks' mean), the whole adapter, and what wraps the graph."""
    whole = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).tolist()
             for k, v in fxpeft.adapter_state_dict(gm).items()}
    return {"losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
            "adapter": whole, "wrapped": type(trainer.model_wrapped).__name__,
            "model_is_graph": trainer.model is gm}


def trainer_reference(output: Path) -> dict:
    """fxpeft.Trainer on the flat graph in one process, the whole global batch per step."""
    gm = adapted()
    trainer = fxpeft.Trainer(model=gm, args=trainer_args(output, 1), train_dataset=trainer_data())
    trainer.train()
    return trainer_facts(trainer, gm)


def trainer_train(output: Path, world: int) -> dict:
    """fxpeft.Trainer.train() on a sharded graph, then a fresh one resumed from checkpoint-2 with
    FSDP2 ``fsdp`` arguments (the route with accelerators; accelerate ignores them on the CPU)."""
    gm = shard_layers(adapted())
    trainer = fxpeft.Trainer(model=gm, args=trainer_args(output / "run", world), train_dataset=trainer_data())
    trainer.train()
    facts = trainer_facts(trainer, gm)
    facts["files"] = sorted(p.name for p in (output / "run" / "checkpoint-2").iterdir())
    again = shard_layers(adapted())
    fsdp = {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2}}  # accepted, ignored on the CPU
    resumed = fxpeft.Trainer(model=again, args=trainer_args(output / "resumed", world, **fsdp),
                             train_dataset=trainer_data())
    resumed.train(resume_from_checkpoint=str(output / "run" / "checkpoint-2"))
    facts["resumed"] = trainer_facts(resumed, again)
    return facts


def sft_train(output: Path, world: int, sharded: bool = True) -> dict:
    """TRL's SFTTrainer with fxpeft's checkpoints on a sharded graph (with FSDP2 `fsdp`
    arguments), or on the flat graph (no `fsdp` arguments: the Trainer wraps it in DDP)."""
    import datasets
    import trl
    from conftest import word_texts, word_tokenizer
    gm = shard_layers(adapted()) if sharded else adapted()
    texts = datasets.Dataset.from_dict({"text": word_texts(8, words=12, seed=1)})
    args = trl.SFTConfig(str(output), max_length=32, per_device_train_batch_size=4 // world, max_steps=2,
                         save_steps=2, logging_steps=1, learning_rate=1e-2, seed=0, report_to=[],
                         use_cpu=True, disable_tqdm=True, train_sampling_strategy="sequential",
                         **({"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2}} if sharded else {}))
    trainer = fxpeft.with_adapter_checkpoints(trl.SFTTrainer)(
        model=gm, args=args, train_dataset=texts, processing_class=word_tokenizer("right"))
    trainer.train()
    return {**trainer_facts(trainer, gm),
            "files": sorted(p.name for p in (output / "checkpoint-2").iterdir())}


@contextlib.contextmanager
def fresh_accelerate(**environment: str) -> Iterator[None]:
    """accelerate's process-wide state made anew (the Trainers above made theirs), and its
    FSDP environment (``accelerate launch`` with an FSDP2 config file sets it) for the block."""
    from accelerate.state import AcceleratorState
    saved = {k: os.environ.get(k) for k in ("ACCELERATE_USE_FSDP", "FSDP_VERSION")}
    AcceleratorState._reset_state(True)
    os.environ.update(environment)
    try:
        yield
    finally:
        AcceleratorState._reset_state(True)
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def accelerate_steps(accelerator: Any, model: Any, optimizer: Any, batches: list) -> list[float]:
    losses = []
    for rows in batches:
        loss = model(input_ids=rows, labels=rows).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(accelerator.reduce(loss.detach(), "mean").item())
    return losses


def _accelerate_prepared(accelerator: Any, world: int) -> tuple:
    """A fresh flat graph, AdamW over it, the global batches of ``train`` (accelerate splits each)."""
    from fsdp_job import BATCH, SEQ, STEPS
    gm = adapted()
    optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    rows = token_batch(STEPS * BATCH, SEQ, seed=3)
    loader = torch.utils.data.DataLoader(rows, batch_size=BATCH // world)
    return accelerate_prepare(accelerator, gm, optimizer, loader)


def accelerate_route(output: Path, world: int) -> dict:
    """``Accelerator(cpu=True, fsdp_plugin=...(fsdp_version=2))`` and
    ``fxpeft.helpers.sharding.accelerate_prepare``: 6 steps with ``save_state`` after 2; then,
    under accelerate's FSDP environment (ACCELERATE_USE_FSDP, FSDP_VERSION=2) instead of the
    plugin, a fresh graph ``load_state``-d from it for the last 4."""
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    folder = output / "accelerate_state"
    with fresh_accelerate():
        accelerator = Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))
        model, optimizer, loader = _accelerate_prepared(accelerator, world)
        batches = list(loader)
        losses = accelerate_steps(accelerator, model, optimizer, batches[:2])
        accelerator.save_state(str(folder))
        losses += accelerate_steps(accelerator, model, optimizer, batches[2:])
        facts = {"wrapped": type(model).__name__, "losses": losses,
                 "adapter": {k: v.full_tensor().tolist() for k, v in fxpeft.adapter_state_dict(model).items()}}
        saved = fxpeft.save(model, output / "accelerate_adapter")  # PEFT's keys, as the reference's
        facts["saved"] = {k: v.tolist() for k, v in load_file(saved / "adapter_model.safetensors").items()}
    with fresh_accelerate(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2"):
        accelerator = Accelerator(cpu=True)
        model, optimizer, loader = _accelerate_prepared(accelerator, world)
        accelerator.load_state(str(folder))
        resumed = accelerate_steps(accelerator, model, optimizer, list(loader)[2:])
        facts["resumed"] = {"losses": resumed, "adapter": {
            k: v.full_tensor().tolist() for k, v in fxpeft.adapter_state_dict(model).items()}}
    facts["files"] = sorted(p.name for p in folder.iterdir())
    return facts


def main(output: Path, checkpoint: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    try:
        facts = {"layers": per_layer(output, rank, world), "whole": whole_graph(rank, world),
                 "bf16": bf16_base(rank, world), "trainer": trainer_routes(output),
                 "qlora": qlora(checkpoint, rank, world),
                 "resume": checkpoint_resume(output, rank, world),
                 "trained": trainer_train(output / "trained", world),
                 "sft": sft_train(output / "sft_trained", world),
                 "sft_ddp": sft_train(output / "sft_ddp", world, sharded=False),
                 "accelerate": accelerate_route(output, world)}
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
