"""Prefix tuning: the graph it builds (keys, values and mask columns at every attention op,
positions counting the prefix), PEFT parity both ways through folders on Llama (GQA), GPT-2 and
Qwen2, with and without PEFT's projection MLP, switching, mixed batches, training, bf16, compile,
fuse, greedy generate with the prefix written into the KV cache once, and every row of a
left-padded batch on OPT (positions from the mask) and Gemma-3 (a sliding window over the prefix)."""

import json

import pytest
import torch

import fxpeft
from conftest import (REPO_ROOT, VOCAB, adapter_nodes, assert_only_adapters_get_grads, emitted_base,
                      tiny_gemma, tiny_gpt2, tiny_llama, tiny_mistral, tiny_opt, tiny_qwen2,
                      tiny_qwen3, token_batch, train)
from fxpeft.errors import FxpeftError, RuleError
from fxpeft.generation.decode_graph import decoder_for
from fxpeft.kinds.prefix_tuning import (PrefixTuningParams, prepend_columns, prepend_prefix,
                                        shift_positions)
from fxpeft.rules import Rule

RULES = str(REPO_ROOT / "passes" / "prefix_tuning.toml")
BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "qwen2": tiny_qwen2}
LENGTH, HIDDEN = 4, 24
ATOL = 1e-5


def _rule(projection=0, length=LENGTH, **params):
    return Rule(match="attention_op", params=PrefixTuningParams(
        num_virtual_tokens=length, projection=projection, **params))


def _batch(seed=1):
    """Ids and a mask with one row left-padded by two tokens."""
    ids = token_batch(batch=2, seq=7, seed=seed)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    return ids, mask


def _peft(model, projection=False, **fields):
    from peft import PrefixTuningConfig, get_peft_model
    torch.manual_seed(3)
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=LENGTH,
                                prefix_projection=projection, encoder_hidden_size=HIDDEN, **fields)
    return get_peft_model(model, config).eval()


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


# --- the graph -------------------------------------------------------------------------------

def test_llama_graph_prepends_per_layer_and_shifts_positions_once():
    gm = fxpeft.rewrite(tiny_llama(), RULES, num_virtual_tokens=LENGTH)
    gm.graph.lint()
    nodes = adapter_nodes(gm, "prefix_tuning")
    targets = [n.target for n in nodes]
    # two layers: keys and values each, one mask per layer, one shift, one table read
    assert targets.count(prepend_prefix) == 4 and targets.count(prepend_columns) == 2
    assert targets.count(shift_positions) == 1 and len(nodes) == 8
    # GQA: 2 layers x (keys, values) x 2 k/v heads x 16, as PEFT's num_key_value_heads sizes it
    assert tuple(gm.get_parameter("prefix_embeddings").shape) == (LENGTH, 2 * 2 * 2 * 16)
    removable = {n.target for n in nodes if n.meta["fxpeft_adapter"].removable}
    assert removable == {prepend_prefix, prepend_columns, shift_positions}
    sdpa = [n for n in gm.graph.nodes if n.target == torch.ops.aten.scaled_dot_product_attention.default]
    assert all(n.args[1].target is prepend_prefix and n.args[2].target is prepend_prefix
               and n.args[3].target is prepend_columns for n in sdpa)


def test_the_rule_file_matches_every_attention_op_of_gpt2_too():
    gm = fxpeft.rewrite(tiny_gpt2(), RULES)  # GPT-2's fused c_attn has no "attention" match
    assert {n.meta["fxpeft_adapter"].module_path for n in adapter_nodes(gm, "prefix_tuning")
            if n.target is prepend_columns} == {"transformer.h.0.attn", "transformer.h.1.attn"}
    assert tuple(gm.get_parameter("prefix_embeddings").shape) == (20, 2 * 2 * 64)


def test_projection_adds_rows_and_an_mlp_that_runs_once():
    gm = fxpeft.rewrite(tiny_llama(), _rule(projection=HIDDEN))
    assert {n: tuple(p.shape) for n, p in gm.named_parameters() if p.requires_grad} == {
        "prefix_tokens": (LENGTH, 32), "prefix_encoder.0.weight": (HIDDEN, 32),
        "prefix_encoder.0.bias": (HIDDEN,), "prefix_encoder.2.weight": (128, HIDDEN),
        "prefix_encoder.2.bias": (128,)}
    assert len([n for n in gm.graph.nodes if n.op == "call_module" and n.target == "prefix_encoder"]) == 1


# --- PEFT parity both ways -------------------------------------------------------------------

@pytest.mark.parametrize("projection", [False, True], ids=["table", "projection"])
@pytest.mark.parametrize("family", BUILDERS)
def test_peft_folder_loads_into_fxpeft_with_equal_logits(family, projection, tmp_path):
    peft_model = _peft(BUILDERS[family](), projection)
    peft_model.save_pretrained(tmp_path)
    gm = fxpeft.load(BUILDERS[family](), tmp_path)
    ids, mask = _batch()
    torch.testing.assert_close(_logits(gm, ids, mask), _logits(peft_model, ids, mask), rtol=0, atol=ATOL)


@pytest.mark.parametrize("projection", [False, True], ids=["table", "projection"])
@pytest.mark.parametrize("family", BUILDERS)
def test_fxpeft_folder_loads_into_peft_with_equal_logits(family, projection, tmp_path):
    from peft import PeftModel
    torch.manual_seed(5)
    gm = fxpeft.rewrite(BUILDERS[family](), _rule(HIDDEN if projection else 0))
    fxpeft.save(gm, tmp_path)
    peft_model = PeftModel.from_pretrained(BUILDERS[family](), tmp_path).eval()
    ids, mask = _batch()
    torch.testing.assert_close(_logits(peft_model, ids, mask), _logits(gm, ids, mask), rtol=0, atol=ATOL)


# PEFT's decoder-model matrix (tests/test_decoder_models.py) has two prefix-tuning configs:
# num_virtual_tokens=10, with and without init_weights="zero"; each on four more families here.
@pytest.mark.parametrize("build, fields", [
    (tiny_mistral, {}), (tiny_gemma, {"init_weights": "zero"}), (tiny_qwen3, {}),
    (tiny_opt, {"init_weights": "zero"})], ids=["mistral", "gemma-zero", "qwen3", "opt-zero"])
def test_peft_decoder_matrix_configs_load_with_equal_logits(build, fields, tmp_path):
    from peft import PrefixTuningConfig, get_peft_model
    peft_model = get_peft_model(build(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10,
                                                            **fields)).eval()
    peft_model.save_pretrained(tmp_path)
    ids, mask = _batch()
    ours, theirs = _logits(fxpeft.load(build(), tmp_path), ids, mask), _logits(peft_model, ids, mask)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)


def _windowed_gemma3():
    """Gemma-3 with a sliding layer (window 16) and a full one: 10 prefix entries and 7 tokens
    reach past the window."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    torch.manual_seed(0)
    return Gemma3ForCausalLM(Gemma3TextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, vocab_size=VOCAB, sliding_window=16,
        layer_types=["sliding_attention", "full_attention"])).eval()


def _randomized_peft(build, fields):
    from peft import PrefixTuningConfig, get_peft_model
    peft_model = get_peft_model(build(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10,
                                                            **fields)).eval()
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(
            torch.randn(peft_model.prompt_encoder["default"].embedding.weight.shape,
                        generator=torch.Generator().manual_seed(4)))
    return peft_model


@pytest.mark.parametrize("fields", [{}, {"init_weights": "zero"}], ids=["random", "zero"])
@pytest.mark.parametrize("build", [tiny_opt, _windowed_gemma3], ids=["opt", "gemma3"])
def test_left_padding_and_sliding_windows_match_peft_in_every_row(build, fields, tmp_path):
    """OPT numbers padding -1 from the mask, behind PEFT's cache too (the shift leaves it);
    Gemma-3's sliding layer lets query ``i`` see prefix entry ``j`` only while ``10 + i - j < 16``
    (the window runs over the cache), its full layer every entry. Every row, padding included."""
    peft_model = _randomized_peft(build, fields)
    peft_model.save_pretrained(tmp_path)
    gm = fxpeft.load(build(), tmp_path)
    ids, mask = _batch()
    torch.testing.assert_close(_logits(gm, ids, mask), _logits(peft_model, ids, mask), rtol=0, atol=ATOL)
    windows = [n.args[3] for n in gm.graph.nodes if n.target is prepend_columns]
    assert windows == ([16, None] if build is _windowed_gemma3 else [None, None])


def test_greedy_generate_past_the_window_equals_peft(tmp_path):
    """The decode graph's cache holds the prefix at positions 0..9: its window drops them as
    transformers' does, 10 + 7 + 8 tokens being past the window of 16."""
    model = _windowed_gemma3()
    with torch.no_grad():  # decisive logits, so the comparison is of tokens, not of ties
        model.get_output_embeddings().weight.mul_(8)
    peft_model = _randomized_peft(lambda: model, {})
    peft_model.save_pretrained(tmp_path)
    gm = fxpeft.load(model, tmp_path)
    ids, mask = _batch()
    ours = fxpeft.generate(gm, ids, max_new_tokens=8, attention_mask=mask, eos_token_id=[])
    assert torch.equal(ours, _greedy_over_peft_forward(peft_model, ids, mask, 8))


def test_positions_count_the_prefix_as_peft_on_this_transformers():
    """PEFT's forward hands the model a cache of LENGTH entries: transformers 5.25 numbers the
    tokens from LENGTH (and PEFT adds LENGTH to position_ids given)."""
    ids, mask = _batch()
    peft_model = _peft(tiny_llama())
    with torch.no_grad():
        cache = peft_model.get_prompt(2)
        full = torch.cat([torch.ones(2, LENGTH, dtype=mask.dtype), mask], 1)
        steps = torch.arange(ids.shape[1]).expand(2, -1)
        counted = tiny_llama()(input_ids=ids, attention_mask=full, past_key_values=cache,
                               position_ids=steps + LENGTH).logits
        given = peft_model(input_ids=ids, attention_mask=mask, position_ids=steps).logits
    torch.testing.assert_close(_logits(peft_model, ids, mask), counted, rtol=0, atol=0)
    torch.testing.assert_close(given, counted, rtol=0, atol=0)


def test_saved_folder_holds_peft_key_and_config(tmp_path):
    from safetensors.torch import load_file
    gm = fxpeft.rewrite(tiny_llama(), _rule(HIDDEN, init="zero"))
    fxpeft.save(gm, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {"prompt_embeddings": (LENGTH, 128)}
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "num_virtual_tokens", "token_dim", "num_attention_heads",
                                   "num_layers", "prefix_projection", "encoder_hidden_size",
                                   "init_weights", "num_transformer_submodules")} == {
        "peft_type": "PREFIX_TUNING", "num_virtual_tokens": LENGTH, "token_dim": 32,
        "num_attention_heads": 2, "num_layers": 2, "prefix_projection": True,
        "encoder_hidden_size": HIDDEN, "init_weights": "zero", "num_transformer_submodules": 1}
    # zero init: the last linear is zero, so the table is the bias, zero too (PEFT's no-op keys)
    assert not tensors["prompt_embeddings"].any()
    again = fxpeft.load(tiny_llama(), tmp_path, trainable=True)  # the plain table, as PEFT loads it
    assert [n for n, p in again.named_parameters() if p.requires_grad] == ["prefix_embeddings"]
    ids, mask = _batch()
    torch.testing.assert_close(_logits(again, ids, mask), _logits(gm, ids, mask), rtol=0, atol=ATOL)


# --- switching, mixed batches, merge ----------------------------------------------------------

def test_off_is_the_base_model_and_adapters_switch_and_delete():
    model = tiny_llama()
    ids, mask = _batch()
    gm = fxpeft.rewrite(model, _rule())
    fxpeft.add_adapter(gm, "long", _rule(length=6))
    base = _logits(emitted_base(model), ids, mask)
    with gm.disable_adapters():  # masked columns get exactly zero weight; SDPA sums in other blocks
        torch.testing.assert_close(_logits(gm, ids, mask), base, rtol=0, atol=1e-6)
    alone = fxpeft.rewrite(tiny_llama(), _rule(length=6), adapter="long")
    with torch.no_grad():
        alone.get_parameter("prefix_embeddings_long").copy_(gm.get_parameter("prefix_embeddings_long"))
    gm.set_adapter("long")
    assert [n for n, p in gm.named_parameters() if p.requires_grad] == ["prefix_embeddings_long"]
    torch.testing.assert_close(_logits(gm, ids, mask), _logits(alone, ids, mask), rtol=0, atol=ATOL)
    gm.delete_adapter("long")
    assert gm.active_adapters == [] and len(adapter_nodes(gm, "prefix_tuning")) == 8
    gm.delete_adapter("default")
    assert len(gm.graph.nodes) == len(emitted_base(model).graph.nodes)
    torch.testing.assert_close(_logits(gm, ids, mask), base, rtol=0, atol=0)


def test_mixed_batches_gate_each_sample():
    ids, mask = _batch()
    gm = fxpeft.rewrite(tiny_llama(), _rule())
    fxpeft.add_adapter(gm, "other", _rule(length=2))
    mixed = gm(input_ids=ids, attention_mask=mask, adapter_names=["other", "__base__"]).logits
    gm.set_adapter("other")
    torch.testing.assert_close(mixed[0], _logits(gm, ids, mask)[0], rtol=0, atol=ATOL)
    with gm.disable_adapters():
        torch.testing.assert_close(mixed[1], _logits(gm, ids, mask)[1], rtol=0, atol=ATOL)


def test_merge_is_refused_with_the_reason():
    gm = fxpeft.rewrite(tiny_llama(), _rule())
    with pytest.raises(FxpeftError, match="prefix_tuning adapter 'default' .* cannot be merged.*softmax"):
        fxpeft.merge(gm)


# --- training, dtypes, compile, fuse ----------------------------------------------------------

@pytest.mark.parametrize("projection", [0, HIDDEN], ids=["table", "projection"])
def test_gradients_reach_only_the_prefix_and_training_lowers_the_loss(projection):
    gm = fxpeft.rewrite(tiny_qwen2(), _rule(projection)).train()
    ids, mask = _batch()
    labels = ids.masked_fill(mask == 0, -100)
    gm(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert_only_adapters_get_grads(gm)
    gm.zero_grad()
    losses = train(gm, lambda m: m(input_ids=ids, attention_mask=mask, labels=labels).loss, 8, lr=0.05)
    assert losses[-1] < losses[0] - 0.1, losses


def test_bf16_base_keeps_an_fp32_prefix_as_peft(tmp_path):
    peft_model = _peft(tiny_llama().to(torch.bfloat16))
    peft_model.save_pretrained(tmp_path)
    gm = fxpeft.load(tiny_llama().to(torch.bfloat16), tmp_path)
    assert gm.get_parameter("prefix_embeddings").dtype == torch.float32  # cast where it joins
    ids, mask = _batch()
    ours, theirs = _logits(gm, ids, mask), _logits(peft_model, ids, mask)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-2)  # bf16 resolution


def test_compiles_with_fullgraph_forward_and_backward():
    gm = fxpeft.rewrite(tiny_llama(), _rule()).train()
    ids, mask = _batch()
    torch._dynamo.reset()
    compiled = torch.compile(gm, fullgraph=True, dynamic=True)
    compiled(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    grad = gm.get_parameter("prefix_embeddings").grad.clone()
    gm.zero_grad()
    gm(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    torch.testing.assert_close(grad, gm.get_parameter("prefix_embeddings").grad, rtol=1e-4, atol=1e-5)
    with torch._dynamo.config.patch(error_on_recompile=True), gm.disable_adapters():
        off = compiled(input_ids=ids, attention_mask=mask, labels=ids).loss  # gates are data
        torch.testing.assert_close(off, gm(input_ids=ids, attention_mask=mask, labels=ids).loss,
                                   rtol=0, atol=1e-5)
    torch._dynamo.reset()


def test_fuse_leaves_it_working():
    ids, mask = _batch()
    gm = fxpeft.rewrite(tiny_llama(), _rule(HIDDEN))
    fused = fxpeft.fuse(gm)
    assert adapter_nodes(fused, "prefix_tuning")
    torch.testing.assert_close(_logits(fused, ids, mask), _logits(gm, ids, mask), rtol=0, atol=ATOL)


# --- generate: the prefix written into the KV cache once ---------------------------------------

def _greedy_over_peft_forward(peft_model, ids, mask, new):
    """Greedy decoding by full forwards of PEFT's model, with the positions transformers'
    ``generate`` gives (real tokens counted, padding 1; PEFT adds the prefix length): what PEFT's
    ``generate`` means. On transformers 5.25, PEFT 0.21.2's cached ``generate`` does not match
    it for Llama and Qwen2 (it drops or re-injects the prefix), nor does its ``use_cache=False``
    one for Llama (checked below against GPT-2 and Qwen2, where it does)."""
    with torch.no_grad():
        for _ in range(new):
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
            logits = peft_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
    return ids


@pytest.mark.parametrize("family", BUILDERS)
def test_greedy_generate_with_the_cache_equals_peft(family, tmp_path):
    model = BUILDERS[family]()
    with torch.no_grad():  # decisive logits, so the comparison is of tokens, not of ties
        model.get_output_embeddings().weight.mul_(8)
    peft_model = _peft(model)
    peft_model.save_pretrained(tmp_path)
    gm = fxpeft.load(model, tmp_path)
    ids, mask = _batch()
    ours = fxpeft.generate(gm, ids, max_new_tokens=6, attention_mask=mask, eos_token_id=[])
    assert torch.equal(ours, _greedy_over_peft_forward(peft_model, ids, mask, 6))
    if family != "llama":
        with torch.no_grad():
            assert torch.equal(ours, peft_model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                use_cache=False, eos_token_id=None, pad_token_id=0))
    decoder = decoder_for(gm, 2, ids.shape[1] + 6 + LENGTH)
    assert not adapter_nodes(decoder, "prefix_tuning")  # the cache holds the prefix, not the graph
    if family != "llama":
        return
    with gm.disable_adapters():  # no prefix in the cache: the base model's tokens
        base = fxpeft.generate(gm, ids, max_new_tokens=6, attention_mask=mask, eos_token_id=[])
    with peft_model.disable_adapter(), torch.no_grad():
        assert torch.equal(base, peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                                                     do_sample=False, eos_token_id=None, pad_token_id=0))


# --- errors ----------------------------------------------------------------------------------

def _write_config(folder, **fields):
    from safetensors.torch import save_file
    config = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": LENGTH,
              "token_dim": 32, "num_attention_heads": 2, "num_layers": 2, "num_transformer_submodules": 1,
              "encoder_hidden_size": 32, "prefix_projection": False, **fields}
    folder.mkdir(exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file({"prompt_embeddings": torch.zeros(LENGTH, 128)}, str(folder / "adapter_model.safetensors"))
    return folder


@pytest.mark.parametrize("fields, message", [
    ({"num_transformer_submodules": 2}, "num_transformer_submodules = 2"),
    ({"init_weights": "ones"}, "init_weights = 'ones'"),
    ({"num_virtual_tokens": 0}, "num_virtual_tokens must be a positive integer"),
    ({"token_dim": 64}, "token_dim = 64"),
])
def test_configs_it_cannot_honour_are_located_errors(fields, message, tmp_path):
    folder = _write_config(tmp_path / "adapter", **fields)
    with pytest.raises(FxpeftError, match=f"adapter_config.json: .*{message}"):
        fxpeft.load(tiny_llama(), folder)


def test_rule_errors_are_located():
    with pytest.raises(RuleError, match="params.num_virtual_tokens: expected a positive integer"):
        PrefixTuningParams(num_virtual_tokens=0)
    with pytest.raises(RuleError, match="projection: expected a non-negative integer"):
        PrefixTuningParams(projection=-1)
