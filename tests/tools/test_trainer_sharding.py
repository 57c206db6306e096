"""fxpeft.Trainer and FSDP: the routes that cannot work on the CPU are refused when the Trainer
is made, naming the route that does (accelerate enables its FSDP plugin only with accelerators;
on the CPU it would wrap the graph in DDP). A sharded graph needs a process group: one gloo
process (world size 1) here. ``fsdp`` arguments need a distributed run: their refusal is shown
with 2 processes in tests/integration/test_fsdp_layers.py."""

import pytest
import torch
import torch.distributed as dist
from transformers import TrainingArguments

import fxpeft
from conftest import tiny_llama, token_batch
from fxpeft.helpers.sharding import shard_layers

DATA = [{"input_ids": row, "labels": row} for row in token_batch(4, 8)]


def _args(tmp_path, **overrides):
    return TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True,
                             disable_tqdm=True, **overrides)


@pytest.fixture
def one_process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_sharded_graph_without_the_fsdp2_route_is_refused(tmp_path, one_process_group):
    sharded = shard_layers(fxpeft.rewrite(tiny_llama(), "lora_qv.toml"))
    assert type(sharded.get_parameter("model.layers.0.self_attn.q_proj.lora_A.weight")).__name__ == "DTensor"
    with pytest.raises(fxpeft.FxpeftError, match="a graph sharded by FSDP2 on cpu: .*your own loop"):
        fxpeft.Trainer(model=sharded, args=_args(tmp_path), train_dataset=DATA)
    plain = fxpeft.Trainer(model=fxpeft.rewrite(tiny_llama(), "lora_qv.toml"), args=_args(tmp_path),
                           train_dataset=DATA)  # the flat graph without fsdp: DDP's route, as before
    assert not plain.is_fsdp_enabled and torch.distributed.get_world_size() == 1
