"""merge folds adapters into new base weights; merge_into writes them into the HF model."""

from collections import Counter

import pytest
import torch

import fxpeft
from conftest import emitted_base, randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama, token_batch
from fxpeft.rules import Rule, Where


def ops(gm):
    return Counter((n.op, str(n.target)) for n in gm.graph.nodes if n.op in ("call_function", "call_module"))


@pytest.mark.parametrize("make,rules", [(tiny_llama, "lora_all_linear"), (tiny_gpt2, "lora_all_linear")])
def test_merge_equals_adapted_graph_with_base_ops(make, rules):
    model = make()
    originals = {k: v.clone() for k, v in model.state_dict().items()}
    gm = fxpeft.rewrite(model, rules, dropout=0.0)
    randomize_adapters(gm)
    gm.eval()
    merged = fxpeft.merge(gm)
    merged.graph.lint()
    assert ops(merged) == ops(emitted_base(make()))
    assert len(merged.graph.nodes) == len(emitted_base(make()).graph.nodes)
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, gm(ids).logits, rtol=0, atol=1e-5)
    assert all(torch.equal(originals[k], v) for k, v in model.state_dict().items())


def test_merge_into_gives_a_plain_checkpoint(tmp_path):
    from transformers import BertForSequenceClassification
    model = tiny_bert()
    gm = fxpeft.rewrite(model, Rule(where=Where(path=[r"\.(query|value)$"])), modules_to_save=["classifier"])
    randomize_adapters(gm)
    gm.eval()
    ids = token_batch()
    with torch.no_grad():
        expected = gm(ids).logits
        fxpeft.merge_into(model, gm)
        torch.testing.assert_close(gm(ids).logits, expected, rtol=0, atol=0)  # gm still valid
    model.save_pretrained(tmp_path)
    plain = BertForSequenceClassification.from_pretrained(tmp_path).eval()
    assert not any("lora" in k for k in plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, expected, rtol=0, atol=1e-5)


def test_merge_folds_only_the_active_adapter():
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv", dropout=0.0)
    gm.add_adapter("other", "lora_qv", dropout=0.0, r=2)
    randomize_adapters(gm)
    gm.eval()
    ids = token_batch()
    for active in ("default", "other"):
        gm.set_adapter(active)
        with torch.no_grad():
            torch.testing.assert_close(fxpeft.merge(gm)(ids).logits, gm(ids).logits, rtol=0, atol=1e-5)
