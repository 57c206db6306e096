"""The ``causal_mask`` fuse pass: causal SDPA instead of a built 4-D mask when the caller's mask
is absent or all ones; the built mask, exactly as before, when it has zeros."""

from copy import deepcopy

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import fxpeft
from conftest import randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama, tiny_mistral, tiny_opt, tiny_qwen2, token_batch
from fxpeft.transforms.causal_mask import CausalMask, masked_or_causal_sdpa

aten = torch.ops.aten
OTHER_PASSES = ("drop_inactive", "fold_lora_scale", "share_input_casts", "fuse_lora_a", "fuse_lm_loss",
                "sdpa_gqa", "fp32_short_attention", "gated_activation", "recompute_norms", "strip_leftovers",
                "onednn_linear")


def gpt2_without_dropout():
    return tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def opt_without_dropout():
    return tiny_opt(dropout=0.0, attention_dropout=0.0)


def left_padded(ids: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return mask


def run(gm, ids, **kwargs):
    """Train-mode loss and adapter gradients, then eval logits."""
    gm.zero_grad(set_to_none=True)
    loss = gm.train()(ids, labels=ids, **kwargs).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in gm.named_parameters() if p.grad is not None}
    gm.zero_grad(set_to_none=True)
    with torch.no_grad():
        logits = gm.eval()(ids, **kwargs).logits
    return loss.detach(), logits, grads


@pytest.mark.parametrize("family", [tiny_llama, tiny_qwen2, gpt2_without_dropout, opt_without_dropout])
def test_sdpa_runs_causal_and_the_mask_is_built_only_for_a_mask_with_zeros(family):
    gm = fxpeft.rewrite(family(), "lora_all_linear", dropout=0.0)
    randomize_adapters(gm)
    fused = fxpeft.fuse(gm, skip=OTHER_PASSES)
    fused.graph.lint()
    sdpas = [n for n in gm.graph.nodes if n.target == aten.scaled_dot_product_attention.default]
    causal = [n for n in fused.graph.nodes if n.target == masked_or_causal_sdpa]
    assert len(causal) == len(sdpas) == 2
    masks = [m for m in fused.modules() if isinstance(m, CausalMask)]
    assert len(masks) == 1 and len(masks[0].body.graph.nodes) > 3
    # every SDPA reads the submodule's result: nothing in the graph builds the mask any more
    assert {n.args[3].op for n in causal} == {"call_module"}
    # the mask's nodes, with the packed-sequence choice in front of it where the model packs
    moved = [n for n in masks[0].body.graph.nodes if n.op in ("call_function", "call_module")]
    assert len(fused.graph.nodes) == len(gm.graph.nodes) - len(moved) + 1  # + the submodule's call
    ids = token_batch()
    for kwargs in ({}, {"attention_mask": torch.ones_like(ids)}, {"attention_mask": left_padded(ids)}):
        expected, ours = run(gm, ids, **kwargs), run(fused, ids, **kwargs)
        for value, reference in zip(ours[:2], expected[:2]):
            torch.testing.assert_close(value, reference, rtol=0, atol=1e-5)
        assert ours[2].keys() == expected[2].keys() and ours[2]
        for name, grad in expected[2].items():
            torch.testing.assert_close(ours[2][name], grad, rtol=1e-4, atol=1e-5)


def test_the_mask_is_skipped_for_absent_or_all_ones_masks_and_built_for_padding():
    fused = fxpeft.fuse(fxpeft.rewrite(tiny_llama(), "lora_qv", dropout=0.0))
    built = []
    fused.fxpeft_causal_mask_0.body.register_forward_hook(lambda *_: built.append(1))
    ids = token_batch()
    fused(ids)
    fused(ids, attention_mask=torch.ones_like(ids))
    assert built == []
    fused(ids, attention_mask=left_padded(ids))
    assert built == [1]


@pytest.mark.parametrize("model", [tiny_bert, tiny_mistral])
def test_no_causal_sdpa_where_it_would_not_be_exact(model):
    """BERT attends both ways (the check fails); Mistral has a sliding window (never tried)."""
    fused = fxpeft.fuse(fxpeft.rewrite(model(), "lora_all_linear", dropout=0.0))
    assert [n for n in fused.graph.nodes if n.target == aten.scaled_dot_product_attention.default]
    assert not [n for n in fused.graph.nodes if n.target == masked_or_causal_sdpa]
    assert not [m for m in fused.modules() if isinstance(m, CausalMask)]


def test_switchable_and_compiles_once_with_and_once_without_a_mask():
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv", dropout=0.0)
    assert not [n for n in fxpeft.fuse(gm, skip=("causal_mask",)).graph.nodes
                if n.target == masked_or_causal_sdpa]
    fused = fxpeft.fuse(gm).eval()
    ids = token_batch()
    counter = CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(fused, backend=counter, fullgraph=True)
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": left_padded(ids)}, {}, {"attention_mask": left_padded(ids)}):
            torch.testing.assert_close(compiled(ids, **kwargs).logits, gm.eval()(ids, **kwargs).logits,
                                       rtol=0, atol=1e-5)
    torch._dynamo.reset()
    assert counter.frame_count == 2


def test_a_mask_read_by_anything_but_sdpa_is_left_alone():
    """The submodule returns None for an all-ones mask: only SDPA knows to run causal then."""
    from fxpeft.transforms.causal_mask import causal_mask
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv", dropout=0.0)
    copy = deepcopy(gm)  # an independent graph to edit
    sdpa = next(n for n in copy.graph.nodes if n.target == aten.scaled_dot_product_attention.default)
    with copy.graph.inserting_after(sdpa.args[3]):
        copy.graph.call_function(aten.logical_not.default, (sdpa.args[3],))
    assert causal_mask(copy) == 0
    assert causal_mask(deepcopy(gm)) == 2
