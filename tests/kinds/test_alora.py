"""aLoRA (PEFT's ``LoraConfig(alora_invocation_tokens=...)``): the invocation mask against PEFT's
offsets, the graph, identity at init, the base model's logits before the invocation, PEFT parity
both ways, named adapters and mixed batches, gradients only on adapters, compile fullgraph, the
merge refusal, KV-cached generate equal to PEFT's, and a slice of PEFT's decoder matrix."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import fxpeft
import kind_checks
from conftest import VOCAB, adapter_nodes, assert_only_adapters_get_grads, tiny_llama
from decoder_matrix import CONFIGS, Case, run_case
from fxpeft.graph.records import adapter_records
from fxpeft.rules import Rule, Where
from fxpeft.kinds.alora import AloraParams, activated, invocation_mask
from kind_checks import ATOL, logits

INVOKE = [7, 9]  # an invocation of two tokens


def config(tokens=INVOKE, **extra):
    return LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8,
                      alora_invocation_tokens=tokens, **extra)


def batch():
    """Row 0 invokes twice (the last, at 6, counts), row 1 once at 2, row 2 never."""
    ids = torch.randint(10, VOCAB, (3, 12), generator=torch.Generator().manual_seed(4))
    ids[0, 1:3] = ids[0, 6:8] = torch.tensor(INVOKE)
    ids[1, 2:4] = torch.tensor(INVOKE)
    ids[2, 5] = INVOKE[0]  # half an invocation is none
    return ids


def peft_alora(tokens=INVOKE, seed=3):
    model = get_peft_model(tiny_llama(), config(tokens)).eval()
    kind_checks.perturb(model, "lora_", seed)
    return model


def test_the_mask_is_peft_offsets_last_invocation_on():
    from peft.tuners.lora.variants import calculate_alora_offsets
    generator = torch.Generator().manual_seed(0)
    for tokens in ([3], [3, 4], [3, 3], [4, 3, 4]):
        ids = torch.randint(2, 6, (16, 10), generator=generator)
        offsets = calculate_alora_offsets({"default": config(tokens)}, "default", ids)
        expected = torch.tensor([[t >= 10 - (o or 0) for t in range(10)] for o in offsets])
        assert torch.equal(invocation_mask(ids, tuple(tokens)), expected), tokens


def test_graph_identity_at_init_and_one_mask_per_site():
    ids = batch()
    gm = fxpeft.rewrite(tiny_llama(), config())
    gm.graph.lint()
    masks = [n for n in adapter_nodes(gm, "alora") if n.target is activated]
    assert len(masks) == 4 and {n.args[2] for n in masks} == {tuple(INVOKE)}
    torch.testing.assert_close(logits(gm, ids), logits(tiny_llama(), ids), rtol=0, atol=0)


def test_the_base_model_before_the_invocation_the_adapter_after():
    ids = batch()
    peft_model = peft_alora()
    gm = fxpeft.rewrite(tiny_llama(), config())
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                gm.get_parameter(name.replace("base_model.model.", "").replace(".default", "")).copy_(param)
    ours, base = logits(gm, ids), logits(tiny_llama(), ids)
    torch.testing.assert_close(ours, logits(peft_model, ids), rtol=0, atol=ATOL)
    torch.testing.assert_close(ours[0, :6], base[0, :6], rtol=0, atol=0)  # before the last invocation
    torch.testing.assert_close(ours[1, :2], base[1, :2], rtol=0, atol=0)
    torch.testing.assert_close(ours[2], base[2], rtol=0, atol=0)  # no invocation: the base model
    assert (ours[0, 6:] - base[0, 6:]).abs().amin() > 0 and (ours[1, 2:] - base[1, 2:]).abs().amin() > 0


def test_both_ways_through_folders(tmp_path):
    ids = batch()
    peft_model = peft_alora()
    expected = logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "peft")
    gm = fxpeft.load(tiny_llama(), tmp_path / "peft")
    assert {type(r.params) for r in adapter_records(gm)["default"].rules.rules} == {AloraParams}
    torch.testing.assert_close(logits(gm, ids), expected, rtol=0, atol=ATOL)
    again = PeftModel.from_pretrained(tiny_llama(), str(fxpeft.save(gm, tmp_path / "ours"))).eval()
    assert again.peft_config["default"].alora_invocation_tokens == INVOKE
    torch.testing.assert_close(logits(again, ids), expected, rtol=0, atol=ATOL)


def test_named_adapters_switch_mix_and_save_alone(tmp_path):
    ids = torch.randint(2, VOCAB, (3, 11), generator=torch.Generator().manual_seed(1))
    tokens = {"default": [int(ids[0, 3])], "other": [int(ids[1, 2])]}
    gm = fxpeft.rewrite(tiny_llama(), config(tokens["default"]))
    gm.add_adapter("other", Rule(where=Where(path=[r"\.[qv]_proj$"]),
                                 params=AloraParams(r=4, alpha=8, invocation_tokens=tokens["other"])))
    kind_checks.perturb(gm, "lora_", 5)
    kind_checks.check_named_adapters(gm, tmp_path)


def test_gradients_only_on_adapters_and_compile_fullgraph():
    ids = batch()
    gm = fxpeft.rewrite(tiny_llama(), config())
    kind_checks.perturb(gm, "lora_B", 1)
    gm.train()(ids, labels=ids).loss.backward()
    assert_only_adapters_get_grads(gm)
    gm.zero_grad()
    kind_checks.check_compiles_whole(gm, ids)


def test_merge_is_refused_as_in_peft():
    gm = fxpeft.rewrite(tiny_llama(), config())
    with pytest.raises(fxpeft.FxpeftError, match="aLoRA.*(merge|PEFT)"):
        fxpeft.merge(gm)
    with pytest.raises(NotImplementedError):  # PEFT's own refusal
        peft_alora().merge_and_unload()


def test_generate_with_the_kv_cache_is_peft_generate(tmp_path):
    """Left padding; rows invoked in the prompt and not: offsets from the prompt, every new token
    adapted in an invoked row (PEFT's generate with its cache)."""
    peft_model = peft_alora()
    ids, mask = batch(), torch.ones(3, 12, dtype=torch.long)
    ids[1, :2], mask[1, :2] = 0, 0
    peft_model.save_pretrained(tmp_path / "peft")
    gm = fxpeft.load(tiny_llama(), tmp_path / "peft")
    ours = fxpeft.generate(gm, ids, max_new_tokens=6, attention_mask=mask, eos_token_id=[])
    with torch.no_grad():
        theirs = peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                     eos_token_id=None, pad_token_id=0, min_new_tokens=6)
    assert torch.equal(ours, theirs)
    hf_style = gm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                           eos_token_id=None, pad_token_id=0)  # transformers' call on the graph
    assert torch.equal(hf_style, theirs)
    with gm.disable_adapters():
        plain = fxpeft.generate(gm, ids, max_new_tokens=6, attention_mask=mask, eos_token_id=[])
    assert torch.equal(ours[2], plain[2]) and not torch.equal(ours[:2], plain[:2])


def test_a_conv_or_embedding_target_and_missing_tokens_are_refused():
    with pytest.raises(fxpeft.FxpeftError, match="invocation_tokens"):
        fxpeft.rewrite(tiny_llama(), {"peft_type": "LORA", "target_modules": ["q_proj"],
                                      "alora_invocation_tokens": ["x"]})
    with pytest.raises(fxpeft.FxpeftError, match="embed_tokens"):
        fxpeft.rewrite(tiny_llama(), LoraConfig(target_modules=["embed_tokens"], alora_invocation_tokens=[3]))


def _matrix(model, tokens):
    return next(Case(model, m, c, k) for m, c, k in CONFIGS if k.get("alora_invocation_tokens") == tokens)


@pytest.mark.parametrize("case", [_matrix("GPT2", [1])], ids=lambda c: c.label)  # Conv1D sites
def test_decoder_matrix_rows(case):
    """PEFT's aLoRA rows: logits both ways, no merge (as PEFT), greedy generate = PEFT's."""
    run_case(case)
    assert case.refused is None and "merge" not in case.errors
    assert max(case.errors.values()) <= 1e-5, case.errors
    assert case.generate is True, case.generate_note
