"""FSDP2 layer by layer: ``shard_layers`` (``fxpeft.layer_units`` + ``fully_shard`` per layer and
on the graph), 2 gloo processes on a 4-layer tiny Llama (tests/fsdp_layers_job.py, one spawn
for every setup), against the flat graph in one process with the same global batches."""

import json

import pytest
import torch
from safetensors.torch import load_file

import fsdp_layers_job
from conftest import tiny_llama
from test_ddp import ROOT, torchrun


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(rank 0's facts, rank 1's, the one-process facts, the two saved adapters)."""
    out = tmp_path_factory.mktemp("fsdp_layers")
    tiny_llama().save_pretrained(out / "tiny")  # for QLoRA: quantized on load, as users do
    torchrun(ROOT / "tests" / "fsdp_layers_job.py", str(out / "two"), str(out / "tiny"), cwd=out)
    one = {**fsdp_layers_job.reference(out / "one"), "qlora": fsdp_layers_job.qlora_reference(out / "tiny"),
           "trainer": fsdp_layers_job.trainer_reference(out / "one_trainer")}
    ranks = [json.loads((out / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    weights = [load_file(out / run / "adapter" / "adapter_model.safetensors") for run in ("two", "one")]
    example = json.loads((out / "two" / "example.json").read_text())
    return ranks[0], ranks[1], one, weights, example


def test_losses_and_adapters_equal_one_process_with_the_global_batch(runs):
    rank0, rank1, one, (two_weights, one_weights), _ = runs
    layers = rank0["layers"]
    assert layers["losses"] == rank1["layers"]["losses"]  # all-reduced: the same on both ranks
    # two half-batch means vs one mean: only float summation order differs (measured 7e-7 on
    # weights up to 0.17)
    torch.testing.assert_close(torch.tensor(layers["losses"]), torch.tensor(one["losses"]),
                               rtol=1e-5, atol=0)
    assert sorted(two_weights) == sorted(one_weights) and len(one_weights) == 16
    for key, tensor in one_weights.items():  # whole tensors (gathered), not shards
        torch.testing.assert_close(two_weights[key], tensor, rtol=1e-5, atol=2e-6, msg=key)
    assert max(t.abs().max() for t in one_weights.values()) > 1e-2  # trained


def test_each_rank_holds_half_of_every_layer_and_only_adapters_train(runs):
    layers = runs[0]["layers"]
    assert layers["units"] == fsdp_layers_job.LAYERS
    assert layers["base_fraction"] == [0.5] * 4 and layers["adapter_fraction"] == [0.5] * 4
    assert all(".lora_" in name for name in layers["trainable"]) and len(layers["trainable"]) == 16
    # AdamW state exists only for the 16 adapter tensors, each a DTensor holding this rank's half
    assert layers["optimizer"] == {"state_tensors": 16, "adapter_tensors": 16, "state_sharded": True,
                                   "state_local_numel": 3584, "adapter_numel": 7168}


def test_the_step_gathers_one_layer_at_a_time_and_whole_graph_fsdp_gathers_all(runs):
    layers, whole = runs[0]["layers"], runs[0]["whole"]
    one_layer, root = layers["layer_bytes"][0], layers["root_bytes"]
    assert layers["total"] == whole["total"] == root + 4 * one_layer
    # per layer: the root's own tensors (embeddings, final norm, head: the graph reads them
    # directly) stay gathered through the step, plus one layer at a time, forward and backward
    assert layers["peak"] == root + one_layer
    assert layers["peak"] < 0.35 * layers["total"]
    # whole-graph FSDP (one unit) holds every parameter at once: the check above fails there
    assert whole["peak"] == whole["total"] and not whole["peak"] <= root + one_layer


def test_saved_adapter_restores_into_a_fresh_sharded_graph(runs):
    assert runs[0]["layers"]["restored_equal"] and runs[1]["layers"]["restored_equal"]


def test_load_onto_a_sharded_graph_scatters_the_adapter_and_equals_load_onto_the_base(runs):
    for rank in runs[:2]:
        load = rank["layers"]["load"]
        # the same graph, its q_proj lora_B (64 x 8) a DTensor holding half; frozen, as load's
        # trainable=False; logits equal fxpeft.load onto the unsharded base bit for bit
        assert load["same_graph"] and load["shard"] == ["DTensor", 32, 64] and load["frozen"]
        assert load["logits_equal"]
        assert "sharded by FSDP2" in load["second"] and "so 'second' cannot be added" in load["second"]
        assert "fxpeft.load(gm, folder, adapter='second')), then shard that graph" in load["second"]


def test_accelerate_with_an_fsdp2_plugin_trains_the_graph_per_layer_as_one_process(runs):
    """``Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))`` and
    ``accelerate_prepare``: no DDP around the sharded graph, accelerate's loader gives each rank
    its half of each global batch; losses and adapter equal one process with the whole batch."""
    acc, other, one = runs[0]["accelerate"], runs[1]["accelerate"], runs[2]
    assert acc["wrapped"] == "FSDPFusedAdaptedLlamaForCausalLM"
    assert acc["losses"] == other["losses"] and acc["adapter"] == other["adapter"]
    torch.testing.assert_close(torch.tensor(acc["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=0)
    one_weights = runs[3][1]
    assert sorted(acc["saved"]) == sorted(one_weights)
    for key, tensor in one_weights.items():
        torch.testing.assert_close(torch.tensor(acc["saved"][key]), tensor, rtol=1e-5, atol=2e-6, msg=key)


def test_accelerate_save_state_holds_the_adapter_and_load_state_resumes_exactly(runs):
    """``save_state`` after step 2: the adapter folder, the whole optimizer state, RNG states; no
    model weights. A fresh graph prepared under accelerate's FSDP environment
    (ACCELERATE_USE_FSDP, FSDP_VERSION=2, as an FSDP2 config file sets) and ``load_state``-d
    ends at the uninterrupted run's adapter, with its losses."""
    acc = runs[0]["accelerate"]
    assert acc["files"] == ["adapter_config.json", "adapter_model.safetensors", "fxpeft_rules.toml",
                            "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl"]
    assert acc["resumed"]["losses"] == acc["losses"][2:]
    assert acc["resumed"]["adapter"] == acc["adapter"]


def test_bf16_base_with_fp32_adapters_shards_per_layer_and_trains(runs):
    bf16 = runs[0]["bf16"]
    base = {name: dtype for name, dtype in bf16["dtypes"].items() if ".lora_" not in name}
    adapters = {name: dtype for name, dtype in bf16["dtypes"].items() if ".lora_" in name}
    assert set(base.values()) == {"torch.bfloat16"} and set(adapters.values()) == {"torch.float32"}
    assert bf16["after"] == bf16["dtypes"]  # FSDP kept each tensor's dtype (one unit, two dtypes)
    assert bf16["total"] < 0.55 * runs[0]["layers"]["total"]  # the base is gathered in bf16
    assert bf16["losses"][1] < bf16["losses"][0]
    # the first loss: bf16 base vs fp32 base, on the same weights (rounded)
    assert bf16["losses"][0] == pytest.approx(runs[0]["layers"]["losses"][0], rel=1e-2)


def test_the_trainer_refuses_fsdp_arguments_on_an_unsharded_graph_on_the_cpu(runs):
    refusals = runs[0]["trainer"]
    # fxpeft.Trainer and TRL's SFTTrainer with fxpeft's checkpoints on the flat graph: accelerate
    # would wrap it in DDP; the sharded graph with the same arguments is accepted
    assert set(refusals) == {"flat", "sft"}
    for said in refusals.values():
        assert "`fsdp` arguments on cpu: accelerate turns FSDP on only with accelerators" in said
        assert "a graph sharded by fxpeft.helpers.sharding.shard_layers" in said
        assert "fxpeft.Trainer with DDP" in said


def _assert_adapters_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys() and len(want) == 16
    for key, value in want.items():
        torch.testing.assert_close(torch.tensor(got[key]), torch.tensor(value), rtol=1e-5, atol=2e-6, msg=key)


def test_the_trainer_trains_a_sharded_graph_as_one_process_with_the_global_batch(runs):
    """fxpeft.Trainer.train() under torchrun on the CPU: no DDP around the sharded graph (FSDP2's
    reduce-scatter averages the gradients), the data loader gives each rank its half of each
    global batch, gradient clipping (at 0.5, below every step's norm) sees the global norm."""
    rank0, rank1, one = runs[0]["trained"], runs[1]["trained"], runs[2]["trainer"]
    assert rank0["wrapped"] == "FSDPFusedAdaptedLlamaForCausalLM" and rank0["model_is_graph"]
    assert one["wrapped"] == "AdaptedLlamaForCausalLM"
    assert len(one["losses"]) == fsdp_layers_job.TRAINER_STEPS and rank0["losses"] == rank1["losses"]
    # measured: losses equal to 1.2e-7 relative, adapters to 1.4e-6
    torch.testing.assert_close(torch.tensor(rank0["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=0)
    _assert_adapters_close(rank0["adapter"], one["adapter"])
    assert rank0["adapter"] == rank1["adapter"]


def test_the_trainer_checkpoint_of_a_sharded_graph_holds_the_adapter_and_resumes_exactly(runs):
    """The resumed Trainer is given FSDP2 ``fsdp`` arguments (the route with accelerators;
    accelerate ignores them on the CPU): it trains the sharded graph all the same."""
    trained = runs[0]["trained"]
    assert trained["files"] == ["adapter_config.json", "adapter_model.safetensors", "fxpeft_rules.toml",
                                "optimizer.pt", "rng_state_0.pth", "rng_state_1.pth", "scheduler.pt",
                                "trainer_state.json", "training_args.bin"]  # no base weights
    # a fresh sharded graph, train(resume_from_checkpoint=checkpoint-2): the same step-4 adapter
    assert trained["resumed"]["adapter"] == trained["adapter"]
    assert trained["resumed"]["losses"] == trained["losses"]  # steps 1-2 from the checkpoint's state


def test_trl_sft_trainer_trains_a_sharded_graph_as_under_ddp_with_adapter_checkpoints(runs):
    """TRL's SFTTrainer (fxpeft's checkpoints) on the sharded graph, with FSDP2 ``fsdp``
    arguments, ends where it ends on the flat graph wrapped in DDP, the route that already worked (measured: bit for bit). Both differ
    from one process with the global batch after the first step (adapter by 1e-2, measured):
    TRL's batching, not the sharding, so no one-process comparison here."""
    sft, other, ddp = runs[0]["sft"], runs[1]["sft"], runs[0]["sft_ddp"]
    assert sft["wrapped"] == "FSDPFusedAdaptedLlamaForCausalLM" and sft["model_is_graph"]
    assert ddp["wrapped"] == "DistributedDataParallel"
    torch.testing.assert_close(torch.tensor(sft["losses"]), torch.tensor(ddp["losses"]), rtol=1e-5, atol=0)
    _assert_adapters_close(sft["adapter"], ddp["adapter"])
    assert len(sft["losses"]) == 2 and sft["losses"] == other["losses"] and sft["adapter"] == other["adapter"]
    assert max(abs(x) for key, rows in sft["adapter"].items() if "lora_B" in key
               for row in rows for x in row) > 1e-3  # trained: B moved away from zero
    assert "model.safetensors" not in sft["files"]
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt"} <= set(sft["files"])


def test_qlora_nf4_base_shards_per_layer_and_equals_the_unsharded_qlora_graph(runs):
    rank0, rank1, one = runs[0]["qlora"], runs[1]["qlora"], runs[2]["qlora"]
    # q_proj's packed nf4 weight (64 x 64 values, 2 a byte: 1024 bf16 elements) is a DTensor
    # holding half per rank; the 4-bit op reads it gathered, byte for byte (measured: losses
    # equal to 2e-7, weights to 1e-6)
    assert rank0["packed"] == ["DTensor", "torch.bfloat16", 512, 1024]
    assert rank0["losses"] == rank1["losses"]
    torch.testing.assert_close(torch.tensor(rank0["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=0)
    assert rank0["adapter"].keys() == one["adapter"].keys() and len(one["adapter"]) == 8
    for key, value in one["adapter"].items():
        torch.testing.assert_close(torch.tensor(rank0["adapter"][key]), torch.tensor(value),
                                   rtol=1e-5, atol=2e-6, msg=key)
    assert max(abs(x) for key, rows in one["adapter"].items() if "lora_B" in key
               for row in rows for x in row) > 1e-2  # trained: B moved away from zero


def test_the_example_prints_per_rank_memory_of_ddp_whole_graph_and_per_layer_fsdp(runs):
    example = runs[4]
    assert example["world_size"] == 2 and len(example["ranks"]) == 2
    for rows in example["ranks"]:
        ddp, whole, layers = rows
        assert [r["mode"] for r in rows] == ["ddp", "whole", "layers"]
        assert ddp["losses"] == pytest.approx(layers["losses"], rel=1e-5)  # same batches, same math
        assert whole["losses"] == pytest.approx(layers["losses"], rel=1e-5)
        assert whole["resident_mib"] == layers["resident_mib"] == pytest.approx(ddp["resident_mib"] / 2, rel=0.01)
        assert whole["gathered_peak_mib"] == ddp["resident_mib"]  # every parameter at once
        assert layers["params_peak_mib"] < ddp["params_peak_mib"] < whole["params_peak_mib"]


def test_trainer_checkpoints_of_a_sharded_graph_hold_the_adapter_and_resume_exactly(runs):
    """fxpeft.Trainer's checkpoint methods, called directly."""
    resume, other = runs[0]["resume"], runs[1]["resume"]
    assert resume["files"] == ["adapter_config.json", "adapter_model.safetensors", "fxpeft_rules.toml",
                               "optimizer.pt", "scheduler.pt", "training_args.bin"]  # no base weights
    # AdamW's state gathered whole (rank 0 writes it): plain tensors, one per adapter tensor
    assert resume["optimizer"] == {k: ["Tensor", shape] for k, shape in resume["adapter_shapes"].items()}
    # a fresh sharded graph resumed at step 2 ends at the uninterrupted run's step-4 adapter
    assert resume["equal"] and other["equal"]
