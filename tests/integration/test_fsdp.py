"""FSDP2 over an adapted graph: ``fully_shard`` on the whole graph, 2 gloo processes on the CPU
(tests/fsdp_job.py), against the same job in one process without FSDP."""

import json

import torch
from safetensors.torch import load_file

import fsdp_job
import fxpeft
from conftest import tiny_llama
from test_ddp import ROOT, torchrun


def test_fully_shard_trains_like_one_process_and_saves_the_gathered_adapter(tmp_path):
    torchrun(ROOT / "tests" / "fsdp_job.py", str(tmp_path / "two"), cwd=tmp_path)
    one = fsdp_job.main(tmp_path / "one")
    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # the same all-reduced losses and shard facts on both ranks
    # every parameter (base and adapter) is a DTensor; each rank holds about half of the numbers
    assert ranks[0]["sharded"] == "DTensor" and ranks[0]["world"] == 2
    assert ranks[0]["numel"] / 2 <= ranks[0]["local_numel"] < ranks[0]["numel"] * 0.51
    # Two half-batch means vs one mean over the batch: only float summation order differs.
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(one["losses"]),
                               rtol=1e-5, atol=0)
    two_weights = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    one_weights = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    assert sorted(two_weights) == sorted(one_weights) and len(one_weights) == 8
    for key, tensor in one_weights.items():  # whole tensors, not shards
        torch.testing.assert_close(two_weights[key], tensor, rtol=0, atol=2e-5, msg=key)
    assert max(t.abs().max() for t in one_weights.values()) > 1e-2  # trained
    loaded = fxpeft.load(tiny_llama(), tmp_path / "two" / "adapter")  # an ordinary adapter folder
    assert torch.equal(fxpeft.adapter_state_dict(loaded)["model.layers.0.self_attn.q_proj.lora_B.weight"],
                       two_weights["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"])
