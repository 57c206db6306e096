"""The adapted GraphModule: call signature, shapes, padding, train/eval and dropout."""

import pytest
import torch

import fxpeft
from fxpeft.graph_module import sdpa_dropout_p
from conftest import nodes_with_target, randomize_adapters, tiny_bert, tiny_llama, token_batch

aten = torch.ops.aten


@pytest.fixture(scope="module")
def pair():
    model = tiny_llama(attention_dropout=0.1)
    gm = fxpeft.rewrite(model, "lora_qv.toml")
    randomize_adapters(gm)
    return model, gm


def test_returns_the_base_output_type(pair):
    model, gm = pair
    out = gm(token_batch())
    assert type(out) is type(model(token_batch())) and out.loss is None
    assert gm(token_batch(), labels=token_batch()).loss.dim() == 0


@pytest.mark.parametrize("batch,seq", [(1, 1), (1, 5), (5, 3), (2, 64)])
def test_other_batch_and_sequence_sizes(pair, batch, seq):
    model, gm = pair
    base = fxpeft.rewrite(model, "lora_qv.toml")  # B = 0: equals the base model
    ids = token_batch(batch, seq)
    torch.testing.assert_close(base(ids).logits, model(ids).logits, rtol=0, atol=1e-6)
    assert gm(ids).logits.shape == (batch, seq, model.config.vocab_size)


def test_padding_mask_is_honoured(pair):
    model, _ = pair
    gm = fxpeft.rewrite(model, "lora_qv.toml")
    ids, mask = token_batch(2, 8), torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0
    torch.testing.assert_close(gm(ids, attention_mask=mask).logits,
                               model(ids, attention_mask=mask).logits, rtol=0, atol=1e-6)


def test_eval_is_deterministic_and_train_is_not(pair):
    _, gm = pair
    ids = token_batch()
    gm.train()
    assert not torch.equal(gm(ids).logits, gm(ids).logits)
    gm.eval()
    torch.testing.assert_close(gm(ids).logits, gm(ids).logits, rtol=0, atol=0)


def test_train_flips_every_dropout_and_restores_attention_p(pair):
    _, gm = pair
    gm.train()
    drops = nodes_with_target(gm, aten.dropout.default)
    sdpa = nodes_with_target(gm, aten.scaled_dot_product_attention.default)
    assert drops and all(n.args[2] is True for n in drops)
    assert sdpa and all(sdpa_dropout_p(n) == pytest.approx(0.1) for n in sdpa)
    gm.eval()
    assert all(n.args[2] is False for n in drops)
    assert all(sdpa_dropout_p(n) == 0.0 for n in sdpa)


def test_mode_switch_recompiles_only_on_change(pair, monkeypatch):
    _, gm = pair
    gm.eval()
    calls = []
    monkeypatch.setattr(type(gm), "recompile", lambda self: calls.append(1))
    gm.eval()
    gm.eval()
    assert calls == []
    gm.train()
    gm.train()
    assert calls == [1]


def test_base_dropout_is_owned_too():
    model = tiny_bert()  # hidden dropout 0.1 inside the base model
    gm = fxpeft.rewrite(model, fxpeft.rules.Rule(where=fxpeft.rules.Where(path=[r"\.query$"])))
    ids = token_batch()
    gm.eval()
    torch.testing.assert_close(gm(ids).logits, model(ids).logits, rtol=0, atol=0)
    gm.train()
    assert not torch.equal(gm(ids).logits, gm(ids).logits)
    gm.eval()


def test_unknown_keyword_is_a_clear_error(pair):
    _, gm = pair
    with pytest.raises(TypeError, match="unexpected inputs \\['pixel_values'\\]"):
        gm(token_batch(), pixel_values=torch.zeros(1))


def test_too_long_sequence_is_a_clear_error():
    model = tiny_bert()
    gm = fxpeft.rewrite(model, fxpeft.rules.Rule(where=fxpeft.rules.Where(path=[r"\.query$"])))
    with pytest.raises(ValueError, match="exceeds the 256 positions"):
        gm(token_batch(1, 300))
