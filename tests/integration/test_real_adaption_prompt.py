"""LLaMA-Adapter on the real SmolLM2-135M: the top two layers get prompts, a few steps lower the loss."""

import pytest
import torch

import fxpeft

pytestmark = pytest.mark.real
TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
        "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles")


@pytest.fixture(scope="module")
def smollm2():
    from fxpeft.helpers.models import load_smollm2
    return load_smollm2()


def test_training_lowers_the_loss_and_only_prompts_and_gates_learn(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer([TEXT], return_tensors="pt")["input_ids"][:, :32]
    gm = fxpeft.rewrite(model, "llama_adapter.toml")
    with torch.no_grad():
        torch.testing.assert_close(gm(ids).logits, model(ids).logits, rtol=0, atol=0)
    trainable = {n for n, p in gm.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.self_attn.adaption_{k}" for i in (28, 29)
                         for k in ("prompt", "gate")}
    optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=5e-2)
    gm.train()
    losses = []
    for _ in range(6):
        loss = gm(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        assert {n for n, p in gm.named_parameters() if p.grad is not None} == trainable
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(float(p.detach().abs().sum()) > 0 for n, p in gm.named_parameters() if "gate" in n)
