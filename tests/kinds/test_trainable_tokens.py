"""Trainable tokens: PEFT's TrainableTokens alone (TRAINABLE_TOKENS) and as LoraConfig's
trainable_token_indices. Only the chosen rows train (identity at init, gradients only on the
rows), the graph reads the table once through an ``index_copy``, a tied lm_head follows, and
PEFT's folders load both ways with PEFT's logits, merge and greedy generate; named adapters
switch; torch.compile(fullgraph=True); PEFT's custom-model rows reproduce; what cannot be
honoured is refused in one line."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, TrainableTokensConfig, get_peft_model

import fxpeft
from conftest import (VOCAB, adapter_nodes, assert_only_adapters_get_grads, emitted_base, randomize_adapters,
                      tiny_llama)
from fxpeft.errors import MatchError
from fxpeft.kinds.trainable_tokens import TrainableTokensParams
from fxpeft.rules import Rule, RuleSet, Where
from kind_checks import check_compiles_whole, check_generate, logits
from peft_io import matrix_case
from peft_models import peft_custom_cases

ATOL = 1e-5
ROWS = [0, 1, 3]
IDS = torch.tensor([[0, 1, 3, 7, 9, 11], [5, 3, 3, 0, 2, 8]])


def _configs():
    return {"alone": TrainableTokensConfig(token_indices=ROWS),
            "lora": LoraConfig(target_modules=["q_proj"], trainable_token_indices=ROWS,
                               init_lora_weights=False)}


def _moved(model: torch.nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "trainable_tokens_delta" in name:
                param.add_(torch.randn(param.shape, generator=generator))


def test_the_graph_reads_the_table_through_one_index_copy_and_is_identity_at_init():
    gm = fxpeft.rewrite(tiny_llama(), TrainableTokensConfig(token_indices=ROWS))
    gm.graph.lint()
    copies = [n for n in gm.graph.nodes if n.target is torch.ops.aten.index_copy.default]
    assert len(copies) == 1 and copies[0] in adapter_nodes(gm, "trainable_tokens")
    assert copies[0].args[0].target == "model.embed_tokens.weight"
    assert [n for n, p in gm.named_parameters() if p.requires_grad] == ["model.embed_tokens.trainable_tokens_delta"]
    torch.testing.assert_close(logits(gm, IDS), logits(tiny_llama(), IDS), rtol=0, atol=0)


def test_only_the_rows_get_gradients_and_train():
    gm = fxpeft.rewrite(tiny_llama(), _configs()["lora"])
    randomize_adapters(gm)  # LoRA's B off zero, so every adapter tensor gets a gradient
    gm(input_ids=IDS, labels=IDS).loss.backward()
    assert_only_adapters_get_grads(gm)
    delta = gm.get_parameter("model.embed_tokens.token_adapter.trainable_tokens_delta")
    assert delta.grad is not None and delta.grad.abs().sum() > 0
    table = gm.get_parameter("model.embed_tokens.weight")
    assert table.grad is None and not table.requires_grad


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("form", ["alone", "lora"])
def test_peft_folders_load_both_ways_and_merge(tmp_path, form, tied):
    """A tied lm_head follows the new rows in both (one table read twice)."""
    peft_model = get_peft_model(tiny_llama(tie_word_embeddings=tied), _configs()[form]).eval()
    _moved(peft_model)
    expected = logits(peft_model, IDS)
    peft_model.save_pretrained(tmp_path / "peft")
    gm = fxpeft.load(tiny_llama(tie_word_embeddings=tied), tmp_path / "peft")
    torch.testing.assert_close(logits(gm, IDS), expected, rtol=0, atol=ATOL)
    assert (expected - logits(tiny_llama(tie_word_embeddings=tied), IDS)).abs().max() > 1e-3
    back = PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=tied), str(fxpeft.save(gm, tmp_path / "ours")))
    torch.testing.assert_close(logits(back.eval(), IDS), expected, rtol=0, atol=ATOL)
    merged = fxpeft.merge(gm)
    merged.graph.lint()
    assert len(merged.graph.nodes) == len(emitted_base(tiny_llama(tie_word_embeddings=tied)).graph.nodes)
    torch.testing.assert_close(logits(merged, IDS), logits(copy.deepcopy(peft_model).merge_and_unload(), IDS),
                               rtol=0, atol=ATOL)


def test_a_bf16_table_gets_fp32_rows_and_peft_s_logits(tmp_path):
    """PEFT's autocast_adapter_dtype: the rows train in fp32, the graph casts them to the table's."""
    base = tiny_llama().to(torch.bfloat16)
    gm = fxpeft.rewrite(base, TrainableTokensConfig(token_indices=ROWS))
    assert gm.get_parameter("model.embed_tokens.trainable_tokens_delta").dtype == torch.float32
    torch.testing.assert_close(logits(gm, IDS), logits(base, IDS), rtol=0, atol=0)
    peft_model = get_peft_model(tiny_llama().to(torch.bfloat16), TrainableTokensConfig(token_indices=ROWS)).eval()
    _moved(peft_model)
    peft_model.save_pretrained(tmp_path)
    torch.testing.assert_close(logits(fxpeft.load(base, tmp_path), IDS), logits(peft_model, IDS), rtol=0, atol=0)


def test_saved_keys_are_peft_s(tmp_path):
    from safetensors.torch import load_file
    alone = fxpeft.save(fxpeft.rewrite(tiny_llama(tie_word_embeddings=True), _configs()["alone"]), tmp_path / "a")
    assert sorted(load_file(alone / "adapter_model.safetensors")) == [
        "base_model.model.lm_head.trainable_tokens_delta", "base_model.model.model.embed_tokens.trainable_tokens_delta"]
    lora = fxpeft.save(fxpeft.rewrite(tiny_llama(tie_word_embeddings=True), _configs()["lora"]), tmp_path / "l")
    assert "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta" in \
        load_file(lora / "adapter_model.safetensors")


def test_named_adapters_switch_and_refuse_mixed_rows(tmp_path):
    gm = fxpeft.rewrite(tiny_llama(), TrainableTokensConfig(token_indices=ROWS))
    rows = Rule(match="embedding", params=TrainableTokensParams(token_indices=(2, 3)),
                where=Where(path=["embed_tokens"]))
    fxpeft.add_adapter(gm, "other", RuleSet((rows,)))
    _moved(gm)
    outputs = {}
    for name in ("default", "other"):
        gm.set_adapter(name)
        outputs[name] = logits(gm, IDS)
    with gm.disable_adapters():
        torch.testing.assert_close(logits(gm, IDS), logits(tiny_llama(), IDS), rtol=0, atol=0)
    assert (outputs["default"] - outputs["other"]).abs().max() > 1e-3
    alone = fxpeft.load(tiny_llama(), fxpeft.save(gm, tmp_path / "other", adapter="other"))
    torch.testing.assert_close(logits(alone, IDS), outputs["other"], rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match="cannot be mixed per sample"):  # PEFT mixes them; see docs
        logits(gm, IDS, adapter_names=["default", "other"])
    gm.delete_adapter("other")
    assert not any("_other" in n for n, _ in gm.named_parameters())


def test_generate_equals_peft_s_greedy_generate(tmp_path):
    gm = fxpeft.rewrite(tiny_llama(), _configs()["lora"])
    _moved(gm)
    check_generate(gm, tmp_path)


def test_compiles_fullgraph():
    gm = fxpeft.rewrite(tiny_llama(), _configs()["lora"])
    randomize_adapters(gm)
    check_compiles_whole(gm, IDS)


CUSTOM = [case for case in peft_custom_cases() if "trainable_tokens" in case[0]]


@pytest.mark.parametrize("name, model_id, config_class, kwargs", CUSTOM, ids=[c[0] for c in CUSTOM])
def test_peft_custom_model_rows_reproduce(tmp_path, name, model_id, config_class, kwargs):
    """A symbolic_trace graph (the Embedding kept whole) too."""
    errors = matrix_case(model_id, config_class, copy.deepcopy(kwargs), tmp_path)
    assert len(CUSTOM) == 2 and max(errors.values()) <= ATOL, errors


@pytest.mark.parametrize("config, message", [
    (LoraConfig(target_modules=["q_proj"], trainable_token_indices=[1, VOCAB]), r"must be distinct rows"),
    (LoraConfig(target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [1]},
                modules_to_save=["embed_tokens"]), r"also in modules_to_save"),
])
def test_what_cannot_be_honoured_is_one_line(config, message):
    with pytest.raises(fxpeft.FxpeftError, match=message) as refused:
        fxpeft.rewrite(tiny_llama(), config)
    assert "\n" not in str(refused.value) and not isinstance(refused.value, MatchError)
