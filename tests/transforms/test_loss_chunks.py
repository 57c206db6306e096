"""The fused LM-head loss holds at most ``CHUNK_LOGITS_BYTES`` of logits at a time, whatever the
batch (issue 29, item 5: with a fixed 1024-token chunk, a batch of up to 1024 tokens made its
whole ``[tokens, vocab]`` logits, the largest tensors of a fused step), and loss and gradients
still equal the unfused graph's within 1e-5 (fp32)."""

import pytest
import torch

import fxpeft
from conftest import loss_and_grads, randomize_adapters, tiny_llama, token_batch
from fxpeft.registry import is_adapter_parameter
from fxpeft.transforms import lm_loss


@pytest.fixture
def logits_sizes(monkeypatch):
    """The bytes of every product ``project`` makes inside the fused loss."""
    sizes = []
    plain = lm_loss.project

    def recorded(x, weight, bias=None):
        out = plain(x, weight, bias)
        sizes.append(out.numel() * out.element_size())
        return out
    monkeypatch.setattr(lm_loss, "project", recorded)
    return sizes


def test_chunks_keep_the_logits_within_the_budget_at_a_large_vocabulary(logits_sizes):
    gm = fxpeft.rewrite(tiny_llama(hidden_size=16, intermediate_size=32, vocab_size=49152,
                                   num_attention_heads=2, num_key_value_heads=1), "lora_qv", dropout=0.0)
    fused = fxpeft.fuse(gm.train())
    ids = token_batch(batch=2, seq=160)  # 320 tokens: 60 MiB of logits at once
    fused(input_ids=ids, labels=ids).loss.backward()
    logits = [s for s in logits_sizes if s % (49152 * 4) == 0]
    assert len(logits) == 3 and max(logits) <= lm_loss.CHUNK_LOGITS_BYTES  # 128 + 128 + 64 tokens


def test_many_chunks_give_the_unfused_loss_and_gradients(monkeypatch, logits_sizes):
    monkeypatch.setattr(lm_loss, "CHUNK_LOGITS_BYTES", 0)  # MIN_CHUNK_TOKENS per chunk
    monkeypatch.setattr(lm_loss, "MIN_CHUNK_TOKENS", 7)
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv", dropout=0.0).train()
    randomize_adapters(gm)
    fused = fxpeft.fuse(gm)
    fused.graph.lint()
    ids = token_batch(batch=3, seq=11)
    labels = ids.clone()
    labels[0, :4] = -100  # ignored tokens inside and across chunks
    batch = {"input_ids": ids, "labels": labels}
    loss, grads = loss_and_grads(gm, batch)
    fused_loss, fused_grads = loss_and_grads(fused, batch)
    assert len(logits_sizes) == 2 * 5  # 33 tokens in chunks of 7: a forward and an input gradient each
    torch.testing.assert_close(fused_loss, loss, atol=1e-5, rtol=0)
    assert fused_grads.keys() == grads.keys() and all(is_adapter_parameter(n) for n in grads)
    for name in grads:
        torch.testing.assert_close(fused_grads[name], grads[name], atol=1e-5, rtol=0)


def test_identity_at_init_with_many_chunks(monkeypatch):
    monkeypatch.setattr(lm_loss, "CHUNK_LOGITS_BYTES", 0)
    monkeypatch.setattr(lm_loss, "MIN_CHUNK_TOKENS", 5)
    model = tiny_llama()
    ids = token_batch()
    with torch.no_grad():
        expected = model(input_ids=ids, labels=ids).loss
    fused = fxpeft.fuse(fxpeft.rewrite(model, "lora_qv", dropout=0.0).train())
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids, labels=ids).loss, expected, atol=1e-5, rtol=0)
