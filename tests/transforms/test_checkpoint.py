"""Gradient checkpointing as a pass (``fxpeft.fuse(gm, checkpoint="layers")``): each layer
becomes a region recomputed in backward; loss and adapter gradients equal the unchecked graph's
within 1e-5 (the same ops in the same order, recomputed; the RNG state is replayed, so adapter
dropout draws the same masks)."""

import pytest
import torch

import fxpeft
from conftest import loss_and_grads, randomize_adapters, saved_bytes, tiny_llama, tiny_t5, token_batch, train
from fxpeft.transforms.checkpoint import CHECKPOINT_MODULE, CheckpointedRegion


def llama_case(rules):
    gm = fxpeft.rewrite(tiny_llama(num_hidden_layers=3), rules).train()
    ids = token_batch()
    return gm, {"input_ids": ids, "labels": ids}, 3


def t5_case(rules):
    gm = fxpeft.rewrite(tiny_t5(), rules).train()
    ids = token_batch()
    return gm, {"input_ids": ids, "labels": ids[:, :5].contiguous()}, None


@pytest.mark.parametrize("case,rules", [(llama_case, "lora_qv.toml"), (llama_case, "dora_qv.toml"),
                                        (llama_case, "ia3.toml"), (t5_case, "lora_all_linear.toml")])
def test_checkpointed_loss_and_gradients_equal_the_unchecked_graph(case, rules):
    gm, batch, layers = case(rules)
    randomize_adapters(gm)
    expected_loss, expected = loss_and_grads(fxpeft.fuse(gm), batch)
    checked = fxpeft.fuse(gm, checkpoint="layers")
    loss, grads = loss_and_grads(checked, batch)
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=1e-5)
    assert set(grads) == set(expected) == set(fxpeft.adapter_state_dict(gm))
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=1e-5)
    regions = checked.graph.find_nodes(op="call_module")
    regions = [n for n in regions if n.target.startswith(CHECKPOINT_MODULE)]
    if layers is not None:
        assert len(regions) == layers
    checked.graph.lint()


def test_regions_own_no_parameters_and_the_main_graph_keeps_no_layer_op():
    gm, batch, _ = llama_case("lora_qv.toml")
    checked = fxpeft.fuse(gm, checkpoint="layers")
    regions = [m for m in checked.modules() if isinstance(m, CheckpointedRegion)]
    assert len(regions) == 3 and all(not list(r.parameters()) for r in regions)
    assert checked.state_dict().keys() == fxpeft.fuse(gm).state_dict().keys()
    linears = checked.graph.find_nodes(op="call_function", target=torch.ops.aten.linear.default)
    assert linears == []  # every projection (base and LoRA) runs inside a region


def test_checkpointing_keeps_far_fewer_tensors_for_backward():
    gm, batch, _ = llama_case("lora_qv.toml")
    plain, checked = saved_bytes(fxpeft.fuse(gm), batch), saved_bytes(fxpeft.fuse(gm, checkpoint="layers"), batch)
    assert checked < plain / 3, (checked, plain)


def test_training_the_checkpointed_copy_trains_the_adapters_and_eval_runs_without_checkpoint():
    gm, batch, _ = llama_case("lora_qv.toml")
    checked = fxpeft.fuse(gm, checkpoint="layers")
    torch.manual_seed(0)
    losses = train(checked, lambda m: m(**batch).loss, steps=10)
    assert losses[-1] < losses[0]
    with torch.no_grad():
        torch.testing.assert_close(checked.eval()(batch["input_ids"]).logits,
                                   fxpeft.fuse(gm.eval())(batch["input_ids"]).logits, rtol=0, atol=1e-5)


def test_hf_gradient_checkpointing_is_reported_with_the_alternative():
    model = tiny_llama()
    model.gradient_checkpointing_enable()
    with pytest.warns(UserWarning, match=r"does not survive capture.*gm.gradient_checkpointing_enable\(\)"):
        gm = fxpeft.rewrite(model, "lora_qv.toml")
    gm.gradient_checkpointing_enable()  # the graph's own switch runs the checkpointing pass
    assert gm.is_gradient_checkpointing
    with pytest.raises(ValueError, match="checkpoint="):
        fxpeft.fuse(gm, checkpoint="blocks")
