"""fxpeft.Trainer and FSDP2 on the CPU: a graph sharded by ``shard_layers`` trains through the
Trainer with no DDP around it (accelerate has no FSDP on the CPU; FSDP2's own reduce-scatter
averages the gradients), one gloo process (world size 1) here; 2 processes against one with the
same global batch in tests/integration/test_fsdp_layers.py. The routes that cannot work are
refused when the Trainer is made, naming the route that does."""

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from transformers import TrainingArguments

import fxpeft
from conftest import tiny_llama, token_batch
from fxpeft.helpers.sharding import shard_layers
from fxpeft.tools.trainer import check_sharding_route

DATA = [{"input_ids": row, "labels": row} for row in token_batch(4, 8)]


def _args(tmp_path, **overrides):
    return TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=True,
                             **overrides)


@pytest.fixture
def one_process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _sharded():
    torch.manual_seed(0)
    return shard_layers(fxpeft.rewrite(tiny_llama(), "lora_qv.toml", dropout=0.0).train())


def test_a_sharded_graph_trains_through_the_trainer_without_ddp(tmp_path, one_process_group):
    sharded = _sharded()
    assert type(sharded.get_parameter("model.layers.0.self_attn.q_proj.lora_A.weight")).__name__ == "DTensor"
    before = {k: v.full_tensor().clone() for k, v in fxpeft.adapter_state_dict(sharded).items()}
    trainer = fxpeft.Trainer(model=sharded, args=_args(tmp_path, max_steps=2, save_steps=2, learning_rate=1e-2,
                                                       per_device_train_batch_size=2), train_dataset=DATA)
    trainer.train()
    assert trainer.model_wrapped is sharded and trainer.model is sharded  # no DDP around it
    after = fxpeft.adapter_state_dict(sharded)
    moved = [k for k in before if not torch.equal(before[k], after[k].full_tensor())]
    assert sorted(moved) == sorted(k for k in before if "lora_" in k) and len(moved) == 8
    files = sorted(p.name for p in (tmp_path / "checkpoint-2").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "fxpeft_rules.toml", "optimizer.pt",
                     "rng_state.pth", "scheduler.pt", "trainer_state.json", "training_args.bin"]


def test_the_graph_still_runs_after_a_device_move_recompiles_it_under_fsdp2(one_process_group):
    """``.to(device)`` recompiles the graphs; FSDP2's subclasses keep fx's call wrapper (once
    a loop: RecursionError), the Trainer's ``_move_model_to_device`` does this move."""
    sharded, rows = _sharded(), token_batch(2, 8)
    want = sharded(input_ids=rows).logits
    sharded.to("cpu")
    torch.testing.assert_close(sharded(input_ids=rows).logits, want, rtol=0, atol=0)


def _trainer(model, fsdp=False, on=False, version=2, deepspeed=False):
    args = SimpleNamespace(fsdp=fsdp, fsdp_config={"version": version}, device=torch.device("cpu"))
    plugin = SimpleNamespace(fsdp_version=version) if on else None
    return SimpleNamespace(model=model, args=args, is_fsdp_enabled=on, is_deepspeed_enabled=deepspeed,
                           accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)))


def test_the_routes_that_cannot_work_are_refused_naming_the_one_that_does(one_process_group):
    flat, sharded = fxpeft.rewrite(tiny_llama(), "lora_qv.toml"), _sharded()
    check_sharding_route(_trainer(sharded))  # no fsdp arguments on the CPU: trains (above)
    check_sharding_route(_trainer(sharded, fsdp=True))  # the arguments accelerate ignores on the CPU
    check_sharding_route(_trainer(sharded, fsdp=True, on=True))  # accelerate's FSDP2 (accelerators)
    check_sharding_route(_trainer(flat))  # DDP's route
    refused = {
        "`fsdp` arguments on cpu: accelerate turns FSDP on only with accelerators": _trainer(flat, fsdp=True),
        "`fsdp` arguments on an unsharded fxpeft graph": _trainer(flat, fsdp=True, on=True),
        "FSDP version 1 wraps modules the flat fxpeft graph never calls": _trainer(sharded, fsdp=True, version=1),
        "DeepSpeed partitions parameters": _trainer(sharded, deepspeed=True)}
    for said, trainer in refused.items():
        with pytest.raises(fxpeft.FxpeftError, match=said) as caught:
            check_sharding_route(trainer)
        assert "shard_layers" in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(fxpeft.FxpeftError, match="version 1"):  # accelerate's FSDP1 plugin too
        check_sharding_route(_trainer(sharded, fsdp=True, on=True, version=1))
