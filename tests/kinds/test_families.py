"""LoRA on every model family: branch counts, lint, identity at init, gradients on adapters only."""

import pytest
import torch

import fxpeft
import copy

from conftest import (adapter_nodes, assert_only_adapters_get_grads, lora_branch_count, randomize_adapters,
                      tiny_bert, tiny_gpt2, tiny_llama, tiny_mistral, tiny_opt, tiny_qwen2, tiny_t5,
                      token_batch)
from fxpeft.rules import LoraParams, Rule, Where


def qv_rule(*paths: str) -> Rule:
    return Rule(where=Where(path=list(paths)), params=LoraParams(r=4, alpha=8))


def lm_batch():
    ids = token_batch(3, 10)
    return {"input_ids": ids}, {"labels": ids}


def bert_batch():
    return {"input_ids": token_batch(3, 10)}, {"labels": torch.tensor([0, 2, 1])}


def t5_batch():
    return ({"input_ids": token_batch(3, 10), "decoder_input_ids": token_batch(3, 7, seed=2)},
            {"labels": token_batch(3, 7, seed=3)})


FAMILIES = {
    # name: (builder, rules, expected LoRA branches, batch)
    "llama": (tiny_llama, "lora_qv.toml", 4, lm_batch),
    "mistral": (tiny_mistral, "lora_qv.toml", 4, lm_batch),
    "qwen2": (tiny_qwen2, "lora_qv.toml", 4, lm_batch),
    "opt": (tiny_opt, "lora_qv.toml", 4, lm_batch),
    "gpt2": (tiny_gpt2, qv_rule(r"c_attn$"), 2, lm_batch),
    "bert": (tiny_bert, qv_rule(r"\.query$", r"\.value$"), 4, bert_batch),
    # encoder self-attention (2 layers) + decoder self- and cross-attention (2 layers), q and v
    "t5": (tiny_t5, qv_rule(r"\.q$", r"\.v$"), 12, t5_batch),
}


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    build, rules, branches, batch = FAMILIES[request.param]
    model = build()
    return model, fxpeft.rewrite(model, rules), branches, batch()


def test_branch_count_and_lint(family):
    model, gm, branches, _ = family
    gm.graph.lint()
    assert lora_branch_count(gm) == branches
    lora_linears = [n for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default
                    and n.meta.get("fxpeft_adapter")]
    assert len(lora_linears) == 2 * branches


def _with_deltas(model, gm):
    """A copy of ``model`` whose adapted weights are ``W + scale * B @ A`` (LoRA's definition)."""
    expected = copy.deepcopy(model)
    with torch.no_grad():
        for node in adapter_nodes(gm):
            detail = node.meta["fxpeft_adapter"].detail
            delta = gm.get_parameter(detail.lora_B) @ gm.get_parameter(detail.lora_A) * detail.scale
            weight = expected.get_parameter(detail.weight)
            if node.meta["fxpeft_adapter"].removable:
                weight.add_(delta.T if detail.fan_in_fan_out else delta)
    return expected


def test_identity_at_init_and_the_predicted_change_after(family):
    model, gm, _, (inputs, _) = family
    torch.testing.assert_close(gm(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
    randomize_adapters(gm)
    changed = gm(**inputs).logits
    assert (changed - model(**inputs).logits).abs().max() > 1e-3
    torch.testing.assert_close(changed, _with_deltas(model, gm)(**inputs).logits, rtol=0, atol=1e-5)


def test_gradients_reach_only_adapters(family):
    model, gm, _, (inputs, targets) = family
    randomize_adapters(gm)
    gm.zero_grad(set_to_none=True)
    gm.train()
    gm(**inputs, **targets).loss.backward()
    gm.eval()
    assert_only_adapters_get_grads(gm)


def test_loss_matches_base_model_at_init():
    model = tiny_bert()
    gm = fxpeft.rewrite(model, qv_rule(r"\.query$"))
    inputs, targets = bert_batch()
    torch.testing.assert_close(gm(**inputs, **targets).loss, model(**inputs, **targets).loss)


def test_t5_labels_alone_build_decoder_inputs():
    model = tiny_t5()
    gm = fxpeft.rewrite(model, qv_rule(r"\.q$"))
    ids, labels = token_batch(2, 9), token_batch(2, 5, seed=4)
    ours, theirs = gm(input_ids=ids, labels=labels), model(input_ids=ids, labels=labels)
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=0, atol=0)
    torch.testing.assert_close(ours.loss, theirs.loss)

