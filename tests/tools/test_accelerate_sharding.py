"""accelerate's route to FSDP2 layer by layer: ``fxpeft.helpers.sharding.accelerate_prepare``
shards the graph per layer before ``accelerator.prepare`` (accelerate ignores FSDP plugins on
the CPU and would wrap the graph in DDP), and makes ``save_state`` / ``load_state`` adapter-only.
One gloo process here (world size 1); 2 processes against one with the same global batch, with
the FSDP2 plugin and with accelerate's FSDP environment, in tests/integration/test_fsdp_layers.py.
The setups that cannot work are refused before accelerate sees the graph."""

import json
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from accelerate import Accelerator, FullyShardedDataParallelPlugin
from accelerate.state import AcceleratorState

import fxpeft
from conftest import tiny_llama, token_batch
from fsdp_layers_job import accelerate_steps
from fxpeft.helpers.sharding import accelerate_prepare, shard_layers

ROWS = token_batch(8, 8, seed=4)


@pytest.fixture
def one_process_group():
    AcceleratorState._reset_state(True)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    AcceleratorState._reset_state(True)


def _adapted():
    torch.manual_seed(0)
    return fxpeft.rewrite(tiny_llama(), "lora_qv.toml", dropout=0.0).train()


def _prepared():
    """A fresh graph, its AdamW (made before sharding, as accelerate's examples do) and loader."""
    gm = _adapted()
    optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    loader = torch.utils.data.DataLoader(ROWS, batch_size=2)
    accelerator = Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))
    return (accelerator, *accelerate_prepare(accelerator, gm, optimizer, loader))


def _whole(gm) -> dict:
    return {k: v.full_tensor() for k, v in fxpeft.adapter_state_dict(gm).items()}


def test_accelerate_prepares_a_graph_sharded_per_layer_and_checkpoints_only_the_adapter(tmp_path, one_process_group):
    accelerator, model, optimizer, loader = _prepared()
    assert type(model).__name__ == "FSDPFusedAdaptedLlamaForCausalLM"  # sharded, no DDP around it
    assert [type(m).__name__ for m in model.model.layers.children()] == ["FSDPLayerUnit"] * 2
    # the optimizer was made over the flat graph's tensors: it now holds the sharded adapters
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad} and len(held) == 8
    batches = list(loader)
    losses = accelerate_steps(accelerator, model, optimizer, batches[:2])
    accelerator.save_state(str(tmp_path / "state"))
    losses += accelerate_steps(accelerator, model, optimizer, batches[2:])
    files = sorted(p.name for p in (tmp_path / "state").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "fxpeft_rules.toml",
                     "optimizer.bin", "random_states_0.pkl"]  # no model.safetensors
    saved = torch.load(tmp_path / "state" / "optimizer.bin", weights_only=True)
    assert sorted(saved["state"]) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert all(type(s["exp_avg"]) is torch.Tensor for s in saved["state"].values())  # whole, plain

    AcceleratorState._reset_state(True)
    again, resumed, resumed_optimizer, _ = _prepared()
    again.load_state(str(tmp_path / "state"))
    tail = accelerate_steps(again, resumed, resumed_optimizer, batches[2:])
    assert tail == losses[2:]  # the uninterrupted run's losses, bit for bit
    trained, restored = _whole(model), _whole(resumed)
    assert all(torch.equal(trained[k], restored[k]) for k in trained)
    assert max(v.abs().max() for k, v in trained.items() if "lora_B" in k) > 1e-3  # trained


def test_the_prepared_graph_equals_the_flat_graph_step_for_step(one_process_group):
    accelerator, model, optimizer, loader = _prepared()
    flat = _adapted()
    flat_optimizer = torch.optim.AdamW([p for p in flat.parameters() if p.requires_grad], lr=1e-2)
    batches = list(loader)[:2]
    assert accelerate_steps(accelerator, model, optimizer, batches) == accelerate_steps(accelerator, flat, flat_optimizer, batches)


def _accelerator(kind="MULTI_CPU", processes=1, version=2):
    plugin = SimpleNamespace(fsdp_version=version, mixed_precision_policy=None, reshard_after_forward=True)
    return SimpleNamespace(distributed_type=kind, num_processes=processes,
                           state=SimpleNamespace(fsdp_plugin=plugin))


def test_the_setups_that_cannot_work_are_refused_before_accelerate_sees_the_graph(monkeypatch):
    gm = _adapted()
    refused = {
        "DEEPSPEED partitions parameters the fxpeft graph reads directly": _accelerator("DEEPSPEED", processes=2),
        "FSDP version 1 wraps modules the flat fxpeft graph never calls": _accelerator("FSDP", processes=2, version=1),
        r"accelerate runs 1 of the 2 processes launched .* pass cpu=True": _accelerator("NO"),
    }
    monkeypatch.setenv("WORLD_SIZE", "2")
    for said, accelerator in refused.items():
        with pytest.raises(fxpeft.FxpeftError, match=said) as caught:
            accelerate_prepare(accelerator, gm)
        assert "\n" not in str(caught.value)
    with pytest.raises(fxpeft.FxpeftError, match="expected an fxpeft graph first, got Linear"):
        accelerate_prepare(_accelerator(processes=2), torch.nn.Linear(2, 2))


def test_an_optimizer_that_has_stepped_is_refused(one_process_group):
    gm = _adapted()
    optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    gm(input_ids=ROWS[:2], labels=ROWS[:2]).loss.backward()
    optimizer.step()
    with pytest.raises(fxpeft.FxpeftError, match="the optimizer has taken steps; prepare before the first step"):
        accelerate_prepare(Accelerator(cpu=True), gm, optimizer)


def test_load_onto_a_sharded_graph_fills_its_adapter_and_refuses_a_new_one(tmp_path, one_process_group):
    gm = _adapted()
    for tensor in fxpeft.adapter_state_dict(gm).values():
        torch.nn.init.normal_(tensor, std=0.1)
    folder = fxpeft.save(gm, tmp_path / "a")
    torch.manual_seed(0)
    loaded = fxpeft.load(tiny_llama(), folder)
    sharded = shard_layers(_adapted())
    assert fxpeft.load(sharded, folder) is sharded
    assert all(not p.requires_grad for p in sharded.parameters())  # trainable=False, as load says
    torch.testing.assert_close(sharded.eval()(ROWS).logits, loaded(ROWS).logits, rtol=0, atol=0)
    before = _whole(sharded)
    with pytest.raises(fxpeft.FxpeftError, match=r"sharded by FSDP2, .* so 'second' cannot be added; "
                       r"load it onto the unsharded graph .* then shard that graph") as caught:
        fxpeft.load(sharded, folder, adapter="second")
    assert "\n" not in str(caught.value) and sharded.adapter_names == ["default"]
    assert all(torch.equal(before[k], v) for k, v in _whole(sharded).items())
    # saved from the sharded graph (its linears inside the layer modules): the flat graph's config
    config = json.loads((fxpeft.save(sharded, tmp_path / "b") / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]


def test_ddp_around_a_sharded_graph_is_refused_naming_the_routes_that_work(one_process_group):
    """What plain ``accelerator.prepare`` on a CPU and the stock ``transformers.Trainer`` do with
    a sharded graph: DDP would fail deep inside on DTensors; fxpeft names the working routes. A
    flat graph still takes DDP, and DDP's own list of ignored tensors."""
    sharded = shard_layers(_adapted())
    with pytest.raises(fxpeft.FxpeftError, match="DistributedDataParallel cannot wrap an fxpeft graph "
                                                 "that FSDP2 has sharded .*accelerate_prepare.*fxpeft.Trainer"):
        torch.nn.parallel.DistributedDataParallel(sharded)
    flat = _adapted()
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(flat, ["lm_head.weight"])
    wrapped = torch.nn.parallel.DistributedDataParallel(flat)
    assert wrapped.parameters_to_ignore == {"lm_head.weight"}
    assert wrapped(ROWS[:2], labels=ROWS[:2]).loss.isfinite()
