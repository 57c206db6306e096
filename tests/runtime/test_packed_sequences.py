"""Packed sequences: ``position_ids`` is an optional graph input wherever the eager ``forward``
takes it, filled as the model fills it; a padding-free packed batch (sequences concatenated,
``position_ids`` restarting, no ``attention_mask``) gives the eager model's loss and adapter
gradients, unfused, fused and compiled; a graph that cannot keep the sequences apart says so."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

import fxpeft
from conftest import tiny_bert, tiny_llama, tiny_mistral, tiny_opt, tiny_qwen2, token_batch
from fxpeft.errors import FxpeftError
from fxpeft.rules import LoraParams, Rule, Where
from fxpeft.runtime.masks import PackedMask

LENGTHS = (5, 3, 4)  # three sequences packed in one row, as DataCollatorWithFlattening builds it


def packed_batch(lengths=LENGTHS, seed=3):
    ids = token_batch(1, sum(lengths), seed=seed)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = ids.clone()
    labels[positions == 0] = -100  # no target across a boundary (the collators do the same)
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


def with_peft_weights(base):
    """``(peft_model, gm)``: PEFT's LoRA q,v with random weights, and fxpeft's with the same."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                        init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    gm = fxpeft.rewrite(base, "lora_qv.toml", r=4, alpha=8, dropout=0.0)
    ours = dict(gm.named_parameters())
    with torch.no_grad():
        for name, value in peft_model.named_parameters():
            if ".lora_" in name:
                ours[name.removeprefix("base_model.model.").replace(".default.", ".")].copy_(value)
    return peft_model, gm


def loss_and_adapter_grads(model, batch, **extra):
    model.zero_grad(set_to_none=True)
    loss = model(**batch, **extra).loss
    loss.backward()
    grads = {n.removeprefix("_orig_mod.").removeprefix("base_model.model.").replace(".default.", "."): p.grad.clone()
             for n, p in model.named_parameters() if ".lora_" in n or "lora_" in n.split(".")[-1]}
    return loss.detach(), {n: g for n, g in grads.items() if g is not None}


def assert_same(reference, ours):
    (loss, grads), (our_loss, our_grads) = reference, ours
    assert sorted(our_grads) == sorted(grads) and len(grads) == 8
    torch.testing.assert_close(our_loss, loss, rtol=0, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=0, atol=1e-5, msg=name)


@pytest.fixture(params=["llama", "qwen2"], scope="module")
def packed_pair(request):
    base = {"llama": tiny_llama, "qwen2": tiny_qwen2}[request.param]()
    peft_model, gm = with_peft_weights(base)
    reference = loss_and_adapter_grads(peft_model.train(), packed_batch(), use_cache=False)
    return gm.train(), reference


def test_a_packed_batch_gives_the_eager_loss_and_gradients(packed_pair):
    gm, reference = packed_pair
    assert [m for m in gm.modules() if isinstance(m, PackedMask)]
    assert_same(reference, loss_and_adapter_grads(gm, packed_batch()))


def test_the_fused_copy_gives_them_too(packed_pair):
    gm, reference = packed_pair
    assert_same(reference, loss_and_adapter_grads(fxpeft.fuse(gm), packed_batch()))


def test_the_compiled_graph_gives_them_too(packed_pair):
    gm, reference = packed_pair
    compiled = torch.compile(fxpeft.fuse(gm), dynamic=True)
    assert_same(reference, loss_and_adapter_grads(compiled, packed_batch()))


def test_packed_sequences_do_not_see_each_other():
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv.toml").eval()
    batch = packed_batch()
    logits = gm(batch["input_ids"], position_ids=batch["position_ids"]).logits
    start = 0
    for n in LENGTHS:
        alone = gm(batch["input_ids"][:, start:start + n]).logits
        torch.testing.assert_close(logits[:, start:start + n], alone, rtol=0, atol=1e-5)
        start += n
    # with an attention mask, transformers does not pack: neither does the graph
    masked = gm(batch["input_ids"], position_ids=batch["position_ids"],
                attention_mask=torch.ones_like(batch["input_ids"])).logits
    assert not torch.allclose(masked[:, LENGTHS[0]:], logits[:, LENGTHS[0]:], atol=1e-3)


def test_the_collators_boundary_keywords_are_accepted_beside_position_ids_only():
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv.toml").eval()
    batch = packed_batch()
    boundaries = torch.tensor([0, 5, 8, 12], dtype=torch.int32)
    extra = dict(cu_seq_lens_q=boundaries, cu_seq_lens_k=boundaries, max_length_q=5, max_length_k=5)
    torch.testing.assert_close(gm(**batch, **extra).logits, gm(**batch).logits, rtol=0, atol=0)
    with pytest.raises(TypeError, match="unexpected inputs .*cu_seq_lens_k"):
        gm(batch["input_ids"], **extra)


def test_position_ids_none_is_what_the_model_computes():
    """Llama counts 0..L-1; OPT counts from the attention mask (a left-padded row shifts)."""
    ids = token_batch(2, 6)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    for base in (tiny_llama(), tiny_opt()):
        gm = fxpeft.rewrite(base, "lora_qv.toml").eval()
        assert "position_ids" in gm.capture_info.inputs
        torch.testing.assert_close(gm(ids, attention_mask=mask).logits,
                                   base(ids, attention_mask=mask).logits, rtol=0, atol=1e-5)
    assert gm.capture_info.positions == "attention_mask"
    assert fxpeft.rewrite(tiny_llama(), "lora_qv.toml").capture_info.positions == "counting"


def test_a_model_that_does_not_pack_is_not_packed_by_the_graph():
    base = tiny_opt()  # OPT builds its mask without position_ids: sequences see each other
    gm = fxpeft.rewrite(base, "lora_qv.toml").eval()
    assert not gm.capture_info.packs and not [m for m in gm.modules() if isinstance(m, PackedMask)]
    batch = packed_batch()
    torch.testing.assert_close(gm(**batch).logits, base(**batch, use_cache=False).logits, rtol=0, atol=1e-5)


def test_an_encoder_takes_position_ids_and_packs_as_eager():
    """BERT keeps packed sequences apart from transformers 5.25 on, not in 5.23: as eager, either way."""
    base = tiny_bert()
    gm = fxpeft.rewrite(base, Rule(where=Where(path=[r"\.query$", r"\.value$"]), params=LoraParams(r=4))).eval()
    assert "position_ids" in gm.capture_info.inputs
    assert bool([m for m in gm.modules() if isinstance(m, PackedMask)]) == gm.capture_info.packs
    batch = {k: v for k, v in packed_batch().items() if k != "labels"}
    hidden = base(**batch, output_hidden_states=True)
    torch.testing.assert_close(gm(**batch).logits, hidden.logits, rtol=0, atol=1e-5)


def test_a_windowed_graph_refuses_a_packed_batch_in_one_line():
    gm = fxpeft.rewrite(tiny_mistral(), "lora_qv.toml").eval()  # sliding_window: not masked here
    batch = packed_batch()
    with pytest.raises(FxpeftError, match=r"MistralForCausalLM graph: position_ids restart without "
                                          r"an attention_mask .* windowed") as err:
        gm(**batch)
    assert "\n" not in str(err.value)
    # unpacked sequences with position_ids, or a packed batch with a mask, still run
    ids = token_batch(2, 6)
    gm(ids, position_ids=torch.arange(6)[None])
    gm(**batch, attention_mask=torch.ones_like(batch["input_ids"]))


def test_the_probe_leaves_the_model_as_it_was():
    base = tiny_llama().train()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    fxpeft.rewrite(base, "lora_qv.toml")
    assert base.training and base.config.use_cache
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in base.modules())
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
