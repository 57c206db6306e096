"""Prompt tuning: the graph it builds, switching it off (a shorter sequence), training, and
parity with PEFT's PromptTuningConfig both ways through the folder format, on Llama and T5."""


import pytest
import torch

import fxpeft
from kind_checks import check_compiles_whole, check_switching_compiles_once_per_state
from conftest import (REPO_ROOT, VOCAB, adapter_nodes, assert_only_adapters_get_grads, emitted_base, tiny_bert,
                      tiny_gemma, tiny_gpt2, tiny_llama, tiny_opt, tiny_qwen2, tiny_t5, token_batch,
                      train)
from fxpeft.errors import FxpeftError, PassError, RuleError
from fxpeft.graph.gates import GATE_META
from fxpeft.kinds.prompt_tuning import (PromptTuningParams, place_prompt, prepend_ids,
                                        prepend_labels, prepend_mask)
from fxpeft.names import adapter_node
from fxpeft.rules import Rule

RULES = str(REPO_ROOT / "passes" / "prompt_tuning.toml")
BUILDERS = {"llama": tiny_llama, "t5": tiny_t5}
TASKS = {"llama": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM"}
INITS = ["RANDOM", "SAMPLE_VOCAB", "TEXT"]
def _word(i: int) -> str:
    """Token ``i``'s word in the test tokenizer: letters only (``17`` -> ``tbh``)."""
    return "t" + "".join(chr(ord("a") + int(d)) for d in str(i))


TEXT = " ".join(_word(i) for i in (5, 9, 3, 17))
LENGTH = 5


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A tiny word-level tokenizer on disk (``_word(i)`` is token i): TEXT init without a download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"[UNK]": 0, **{_word(i): i for i in range(1, VOCAB)}}  # special tokens are no prefix
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)
    return str(folder)


def _batch(seed=1):
    """Ids, a mask with padding at the end of one row, and labels (-100 at the padding)."""
    ids = token_batch(batch=3, seq=9, seed=seed)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def _rule(init="random", tokenizer="", **params):
    extra = {"init_text": TEXT, "tokenizer": tokenizer} if init == "text" else {}
    return Rule(match="input_embedding",
                params=PromptTuningParams(num_virtual_tokens=LENGTH, init=init, **extra, **params))


def _randomize(gm, seed=7):
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if "prompt_embeddings" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(seed)))


def _peft_config(family, init, tokenizer_dir):
    from peft import PromptTuningConfig
    text = {"prompt_tuning_init_text": TEXT, "tokenizer_name_or_path": tokenizer_dir} if init == "TEXT" else {}
    return PromptTuningConfig(task_type=TASKS[family], num_virtual_tokens=LENGTH,
                              prompt_tuning_init=init, **text)


# --- the graph -------------------------------------------------------------------------------

def test_llama_graph_lengthens_ids_mask_embeddings_and_labels():
    model = tiny_llama()
    base = emitted_base(model)
    gm = fxpeft.rewrite(model, RULES)
    gm.graph.lint()
    added = adapter_nodes(gm, "prompt_tuning")
    targets = [n.target.__name__ if callable(n.target) else n.op for n in added]
    assert targets == ["getitem", "prepend_mask", "prepend_ids", "get_attr", "place_prompt",
                       "prepend_labels"]  # getitem: the per-sample names, which the prompt refuses
    removable = [n for n in added if adapter_node(n).removable]
    assert [n.target.__name__ for n in removable] == targets[1:3] + targets[4:]
    gates = [n for n in gm.graph.nodes if GATE_META in n.meta]  # the gates module, gate_open
    assert [n.op for n in gates] == ["get_attr", "call_function"]
    assert gates[0].target == "fxpeft_gates" and gates[1].args == (gates[0], "default")
    assert all(gates[1] in n.args for n in removable)
    assert len(gm.graph.nodes) == len(base.graph.nodes) + len(added) + len(gates)
    embedding = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.embedding.default)
    assert list(embedding.users) == [added[4]]  # the prompt goes in right after the lookup
    assert {n: tuple(p.shape) for n, p in gm.named_parameters() if p.requires_grad} == {
        "prompt_embeddings": (20, 64)}
    assert gm.get_parameter("prompt_embeddings").dtype == torch.float32


def test_t5_prompt_goes_in_front_of_the_encoder_only():
    gm = fxpeft.rewrite(tiny_t5(), RULES)
    added = adapter_nodes(gm, "prompt_tuning")
    assert [n.op if n.op == "get_attr" else n.target.__name__ for n in added] == [
        "getitem", "prepend_mask", "prepend_ids", "get_attr", "place_prompt"]  # labels stay
    assert {adapter_node(n).module_path for n in added} == {"encoder.embed_tokens"}
    decoder = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.embedding.default
                   and "decoder" in str(n.meta["nn_module_stack"]))
    assert not any(adapter_node(u) for u in decoder.users)


def test_the_rule_file_matches_the_input_embedding_and_nothing_else():
    assert fxpeft.explain(tiny_llama(), RULES).rules[0].matched == ["model.embed_tokens"]
    assert fxpeft.explain(tiny_t5(), RULES).rules[0].matched == ["encoder.embed_tokens"]
    with pytest.raises(fxpeft.MatchError, match="matched nothing"):
        fxpeft.rewrite(torch.nn.Sequential(torch.nn.Embedding(4, 4)), RULES)


# --- switching it off, several adapters, strip, fuse, merge ------------------------------------

@pytest.mark.parametrize("family", BUILDERS)
def test_off_runs_the_base_model_on_the_shorter_sequence(family):
    model = BUILDERS[family]()
    ids, mask, labels = _batch()
    gm = fxpeft.rewrite(model, RULES)
    on = gm(ids, attention_mask=mask, labels=labels)
    assert on.logits.shape[1] == (ids.shape[1] + 20 if family == "llama" else ids.shape[1])
    with gm.disable_adapters():
        off = gm(ids, attention_mask=mask, labels=labels)
    base = emitted_base(model)(ids, attention_mask=mask, labels=labels)
    assert off.logits.shape[1] == ids.shape[1]
    torch.testing.assert_close(off.logits, base.logits, rtol=0, atol=0)
    torch.testing.assert_close(off.loss, base.loss, rtol=0, atol=0)
    eager = model(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(off.logits, eager.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(gm(ids, attention_mask=mask, labels=labels).logits, on.logits,
                               rtol=0, atol=0)  # back on after the with block


def test_named_adapters_switch_and_delete():
    model = tiny_llama()
    ids = token_batch()
    gm = fxpeft.rewrite(model, RULES)
    fxpeft.add_adapter(gm, "short", RULES, num_virtual_tokens=3)
    assert gm(ids).logits.shape[1] == ids.shape[1] + 20
    gm.set_adapter("short")
    assert gm(ids).logits.shape[1] == ids.shape[1] + 3
    assert [n for n, p in gm.named_parameters() if p.requires_grad] == ["prompt_embeddings_short"]
    gm.delete_adapter("short")
    assert not [n for n in gm.graph.nodes if getattr(adapter_node(n), "adapter", None) == "short"]
    assert gm.active_adapters == [] and gm(ids).logits.shape[1] == ids.shape[1]
    gm.delete_adapter("default")
    assert len(gm.graph.nodes) == len(emitted_base(model).graph.nodes)
    torch.testing.assert_close(gm(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_active_prompts_stack_in_the_order_they_were_added():
    ids, mask, labels = _batch()
    gm = fxpeft.rewrite(tiny_llama(), RULES, num_virtual_tokens=3)
    fxpeft.add_adapter(gm, "second", RULES, num_virtual_tokens=2)
    _randomize(gm)
    gm.set_adapter(["default", "second"])
    joined = fxpeft.rewrite(tiny_llama(), RULES, num_virtual_tokens=5)
    with torch.no_grad():
        joined.get_parameter("prompt_embeddings").copy_(torch.cat(
            [gm.get_parameter("prompt_embeddings"), gm.get_parameter("prompt_embeddings_second")]))
    torch.testing.assert_close(gm(ids, attention_mask=mask, labels=labels).loss,
                               joined(ids, attention_mask=mask, labels=labels).loss, rtol=0, atol=1e-6)


def test_fuse_keeps_an_active_prompt_and_drops_an_inactive_one():
    gm = fxpeft.rewrite(tiny_llama(), RULES)
    ids, mask, labels = _batch()
    fused = fxpeft.fuse(gm)
    torch.testing.assert_close(fused(ids, attention_mask=mask, labels=labels).loss,
                               gm(ids, attention_mask=mask, labels=labels).loss, rtol=0, atol=1e-6)
    fused.train()  # train mode: the fused LM-head loss reads the padded labels
    out = fused(ids, attention_mask=mask, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, gm(ids, attention_mask=mask, labels=labels).loss,
                               rtol=0, atol=1e-5)
    with gm.disable_adapters():
        idle = fxpeft.fuse(gm)
        expected = gm(ids, attention_mask=mask).logits
        torch.testing.assert_close(idle(ids, attention_mask=mask).logits, expected, rtol=0, atol=0)
    assert not adapter_nodes(idle, "prompt_tuning")
    with pytest.raises(FxpeftError, match="'default' is active now"):  # the copy dropped it
        idle(ids, attention_mask=mask)


def test_merge_and_mixed_batches_are_refused():
    gm = fxpeft.rewrite(tiny_llama(), RULES)
    with pytest.raises(FxpeftError, match="prompt_tuning adapter 'default' .* cannot be merged"):
        fxpeft.merge(gm)
    with pytest.raises(ValueError, match="adapters cannot be mixed per sample"):
        gm.eval()(token_batch(batch=2), adapter_names=["default", "__base__"])
    fxpeft.add_adapter(gm, "lora", "lora_qv")  # the Gates call now checks the names first
    with pytest.raises(ValueError, match="\\['default'\\] have modules_to_save copies or prompts"):
        gm(token_batch(batch=2), adapter_names=["lora", "__base__"])
    gm.set_adapter("lora")  # an inactive prompt does not stop a merge, and is stripped by it
    merged = fxpeft.merge(gm)
    assert not adapter_nodes(merged, "prompt_tuning")
    torch.testing.assert_close(merged(token_batch()).logits, gm(token_batch()).logits, rtol=0, atol=1e-5)


# --- training --------------------------------------------------------------------------------

@pytest.mark.parametrize("family", BUILDERS)
def test_gradients_reach_only_the_prompt(family):
    gm = fxpeft.rewrite(BUILDERS[family](), RULES)
    ids, mask, labels = _batch()
    gm(ids, attention_mask=mask, labels=labels).loss.backward()
    assert_only_adapters_get_grads(gm)


def _train(model, steps=20):
    ids, mask, labels = _batch()
    return train(model, lambda m: m(input_ids=ids, attention_mask=mask, labels=labels).loss, steps, lr=0.1)


def test_training_lowers_the_loss_step_for_step_as_peft():
    from peft import get_peft_model
    gm = fxpeft.rewrite(tiny_llama(), RULES, init="sample_vocab", num_virtual_tokens=LENGTH).train()
    peft_model = get_peft_model(tiny_llama(), _peft_config("llama", "RANDOM", ""))
    peft_model.prompt_encoder["default"].embedding.weight.data.copy_(gm.get_parameter("prompt_embeddings"))
    ours, theirs = _train(gm), _train(peft_model.train())
    assert all(b < a for a, b in zip(ours, ours[1:])) and ours[-1] < ours[0] - 0.15, ours
    # a random tiny model leaves a prompt little to learn; PEFT's run shows the same descent
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=0, atol=1e-4)


# --- initialisation --------------------------------------------------------------------------

@pytest.mark.parametrize("build", [tiny_llama, tiny_gemma])
def test_text_init_equals_peft_and_init_ids(build, tokenizer_dir):
    """Gemma scales the rows inside its embedding module; PEFT's init calls the module."""
    from peft import get_peft_model
    peft_model = get_peft_model(build(), _peft_config("llama", "TEXT", tokenizer_dir))
    expected = peft_model.prompt_encoder["default"].embedding.weight
    by_text = fxpeft.rewrite(build(), _rule("text", tokenizer_dir)).get_parameter("prompt_embeddings")
    torch.testing.assert_close(by_text, expected, rtol=0, atol=0)
    by_ids = fxpeft.rewrite(build(), Rule(match="input_embedding", params=PromptTuningParams(
        num_virtual_tokens=LENGTH, init="text", init_ids=[5, 9, 3, 17])))
    torch.testing.assert_close(by_ids.get_parameter("prompt_embeddings"), expected, rtol=0, atol=0)


def test_sample_vocab_takes_embedding_rows_and_random_is_standard_normal():
    model = tiny_llama()
    torch.manual_seed(0)
    sampled = fxpeft.rewrite(model, RULES, init="sample_vocab").get_parameter("prompt_embeddings")
    table = model.get_input_embeddings().weight
    assert all((table == row).all(-1).any() for row in sampled)
    torch.manual_seed(0)
    rows = fxpeft.rewrite(model, RULES, num_virtual_tokens=50).get_parameter("prompt_embeddings")
    assert abs(rows.mean().item()) < 0.05 and abs(rows.std().item() - 1) < 0.05


# --- PEFT parity through the folder format ----------------------------------------------------

def _outputs(model, ids, mask, labels):
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    return out.logits, out.loss


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("family", BUILDERS)
def test_peft_adapter_loads_into_fxpeft_with_equal_outputs(family, init, tokenizer_dir, tmp_path):
    from peft import get_peft_model
    ids, mask, labels = _batch()
    peft_model = get_peft_model(BUILDERS[family](), _peft_config(family, init, tokenizer_dir)).eval()
    _randomize(peft_model)
    peft_model.save_pretrained(tmp_path)
    logits, loss = _outputs(peft_model, ids, mask, labels)
    gm = fxpeft.load(BUILDERS[family](), tmp_path)
    ours = _outputs(gm, ids, mask, labels)
    torch.testing.assert_close(ours[0], logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours[1], loss, rtol=0, atol=1e-5)
    base = BUILDERS[family]()(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert abs(loss - base) > 1e-3  # the prompt mattered


@pytest.mark.parametrize("init", ["random", "sample_vocab", "text"])
@pytest.mark.parametrize("family", BUILDERS)
def test_fxpeft_adapter_loads_into_peft_with_equal_outputs(family, init, tokenizer_dir, tmp_path):
    from peft import PeftModel
    ids, mask, labels = _batch(seed=4)
    gm = fxpeft.rewrite(BUILDERS[family](), _rule(init, tokenizer_dir,
                                                  transformer_submodules=2 if family == "t5" else 1))
    _randomize(gm, seed=11)
    fxpeft.save(gm, tmp_path)
    peft_model = PeftModel.from_pretrained(BUILDERS[family](), tmp_path).eval()
    assert peft_model.peft_config["default"].prompt_tuning_init == init.upper()
    logits, loss = _outputs(gm, ids, mask, labels)
    theirs = _outputs(peft_model, ids, mask, labels)
    torch.testing.assert_close(theirs[0], logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(theirs[1], loss, rtol=0, atol=1e-5)


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_opt, tiny_qwen2, tiny_gemma])
def test_other_families_match_peft(build, tmp_path):
    """GPT-2 and OPT view input_ids before the lookup; Gemma scales inside its embedding module
    (PEFT's prompts are not scaled)."""
    from peft import get_peft_model
    ids, mask, labels = _batch()
    peft_model = get_peft_model(build(), _peft_config("llama", "RANDOM", "")).eval()
    peft_model.save_pretrained(tmp_path)
    ours = _outputs(fxpeft.load(build(), tmp_path), ids, mask, labels)
    theirs = _outputs(peft_model, ids, mask, labels)
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=1e-5)


def test_bf16_base_keeps_an_fp32_prompt_as_peft(tmp_path):
    from peft import get_peft_model
    ids = token_batch()
    peft_model = get_peft_model(tiny_llama().to(torch.bfloat16), _peft_config("llama", "RANDOM", "")).eval()
    peft_model.save_pretrained(tmp_path)
    gm = fxpeft.load(tiny_llama().to(torch.bfloat16), tmp_path)
    assert gm.get_parameter("prompt_embeddings").dtype == torch.float32  # cast where it joins
    ours, theirs = gm(ids).logits, peft_model(input_ids=ids).logits
    assert ours.dtype == theirs.dtype == torch.bfloat16
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-2)  # bf16 resolution (measured: 0)


def test_saved_folder_has_peft_key_and_config(tmp_path):
    import json
    from safetensors.torch import load_file
    gm = fxpeft.rewrite(tiny_t5(), RULES, transformer_submodules=2)
    fxpeft.save(gm, tmp_path)
    assert {k: tuple(v.shape) for k, v in load_file(tmp_path / "adapter_model.safetensors").items()} == {
        "prompt_embeddings": (40, 64)}
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "task_type", "num_virtual_tokens", "token_dim",
                                   "num_transformer_submodules", "num_attention_heads", "num_layers",
                                   "prompt_tuning_init")} == {
        "peft_type": "PROMPT_TUNING", "task_type": "SEQ_2_SEQ_LM", "num_virtual_tokens": 20,
        "token_dim": 64, "num_transformer_submodules": 2, "num_attention_heads": 4, "num_layers": 2,
        "prompt_tuning_init": "RANDOM"}
    again = fxpeft.load(tiny_t5(), tmp_path)  # and fxpeft reads its own folder back
    torch.testing.assert_close(again.get_parameter("prompt_embeddings"),
                               gm.get_parameter("prompt_embeddings"), rtol=0, atol=0)
    assert not again.get_parameter("prompt_embeddings").requires_grad
    trainable = fxpeft.load(tiny_t5(), tmp_path, trainable=True)
    assert [n for n, p in trainable.named_parameters() if p.requires_grad] == ["prompt_embeddings"]


# --- errors ----------------------------------------------------------------------------------

def _write_config(folder, **fields):
    import json
    from safetensors.torch import save_file
    config = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4,
              "token_dim": 64, "num_transformer_submodules": 1, "prompt_tuning_init": "RANDOM", **fields}
    folder.mkdir(exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file({"prompt_embeddings": torch.zeros(4, 64)}, str(folder / "adapter_model.safetensors"))
    return folder


@pytest.mark.parametrize("fields, message", [
    ({"tokenizer_kwargs": {"use_fast": False}}, "tokenizer_kwargs = .* is not supported"),
    ({"num_virtual_tokens": 0}, "num_virtual_tokens must be a positive integer"),
    ({"token_dim": 32}, "token_dim = 32, but the model's embeddings are 64 wide"),
    ({"prompt_tuning_init": "ZEROS"}, "prompt_tuning_init = 'ZEROS'"),
    ({"num_transformer_submodules": 3}, "num_transformer_submodules = 3"),
])
def test_configs_it_cannot_honour_are_located_errors(fields, message, tmp_path):
    folder = _write_config(tmp_path / "adapter", **fields)
    with pytest.raises(FxpeftError, match=f"adapter_config.json: .*{message}"):
        fxpeft.load(tiny_llama(), folder)


def test_rule_errors_are_located():
    with pytest.raises(RuleError, match="params.init: init = \"text\" needs init_ids"):
        PromptTuningParams(init="text", init_text="hello")
    with pytest.raises(RuleError, match="params.init: init_ids, init_text and tokenizer apply"):
        PromptTuningParams(init_ids=[1, 2])
    with pytest.raises(RuleError, match="params.transformer_submodules: expected 1 or 2"):
        PromptTuningParams(transformer_submodules=True)
    with pytest.raises(PassError, match="cannot load the tokenizer '/nonexistent'"):
        fxpeft.rewrite(tiny_llama(), Rule(match="input_embedding", params=PromptTuningParams(
            init="text", init_text="ta", tokenizer="/nonexistent")))


def test_a_text_init_folder_loads_without_its_tokenizer(tmp_path):
    """As PEFT's inference load: the saved prompt is used, the init text is not tokenized."""
    folder = _write_config(tmp_path / "adapter", prompt_tuning_init="TEXT",
                           prompt_tuning_init_text="hello", tokenizer_name_or_path="/nonexistent")
    gm = fxpeft.load(tiny_llama(), folder)
    assert gm.get_parameter("prompt_embeddings").shape == (4, 64)
    fxpeft.save(gm, tmp_path / "again")  # the TEXT provenance survives, and loads back
    again = fxpeft.load(tiny_llama(), tmp_path / "again")
    assert (tmp_path / "again" / "fxpeft_rules.toml").read_text().count("/nonexistent") == 1
    torch.testing.assert_close(again(token_batch()).logits, gm(token_batch()).logits, rtol=0, atol=0)


def test_models_it_cannot_prompt_are_refused():
    with pytest.raises(PassError, match="supports causal and seq2seq LMs.*not SequenceClassifierOutput"):
        fxpeft.rewrite(tiny_bert(), RULES)
    ids = token_batch()
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "position_ids": torch.arange(ids.shape[1]).expand_as(ids)}
    with pytest.raises(PassError, match="cannot lengthen the input position_ids"):
        fxpeft.rewrite(tiny_llama(), RULES, example_inputs=inputs)


def test_text_init_from_ids_alone_is_saved_as_random_and_reloads(tmp_path):
    """PEFT's TEXT needs a tokenizer; the rules file keeps the ids."""
    import json
    gm = fxpeft.rewrite(tiny_llama(), Rule(match="input_embedding", params=PromptTuningParams(
        num_virtual_tokens=LENGTH, init="text", init_ids=[5, 9])))
    fxpeft.save(gm, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["prompt_tuning_init"] == "RANDOM"
    assert "init_ids = [5, 9]" in (tmp_path / "fxpeft_rules.toml").read_text()
    again = fxpeft.load(tiny_llama(), tmp_path)
    torch.testing.assert_close(again.get_parameter("prompt_embeddings"),
                               gm.get_parameter("prompt_embeddings"), rtol=0, atol=0)


def test_nodes_pass_through_when_off():
    ids = torch.tensor([[4, 5]])
    assert prepend_ids(ids, 3, False, None) is ids and prepend_mask(ids, 3, False) is ids
    assert prepend_labels(ids, 3, False) is ids and prepend_labels(None, 3, True) is None
    embeds = torch.zeros(1, 2, 4)
    assert place_prompt(embeds, torch.ones(3, 4), ids, 3, False) is embeds


def test_compiles_whole_forward_and_backward_and_stays_exact():
    """The on/off state is a guarded Python bool (the gates' mirror): no graph break."""
    gm = fxpeft.rewrite(tiny_llama(num_hidden_layers=1), RULES)
    ids = token_batch()
    torch._dynamo.reset()
    assert torch._dynamo.explain(gm)(ids).graph_break_count == 0
    check_compiles_whole(gm, ids)


def test_switching_under_fullgraph_compiles_once_per_state():
    model = tiny_llama(num_hidden_layers=1)
    gm = fxpeft.rewrite(model, RULES)
    _randomize(gm)
    ids = token_batch()
    adapted = check_switching_compiles_once_per_state(model, gm, ids)
    assert adapted.shape[1] == ids.shape[1] + gm.get_parameter("prompt_embeddings").shape[0]


def test_copies_share_or_copy_the_on_off_mirror_with_the_gates():
    """The bool the nodes read (``Gates.opened``) follows the gates everywhere: a deep copy has
    its own, a fused copy shares the graph's, a pickled gates module keeps it, and adding,
    switching and deleting adapters keep it equal to the gate buffers."""
    import copy
    import pickle
    gm = fxpeft.rewrite(tiny_llama(num_hidden_layers=1), RULES).eval()
    ids = token_batch()
    lengths = lambda m: m(ids).logits.shape[1]  # noqa: E731
    longer, plain = lengths(gm), ids.shape[1]
    twin, fused = copy.deepcopy(gm), fxpeft.fuse(gm)
    assert fused.fxpeft_gates is gm.fxpeft_gates and twin.fxpeft_gates is not gm.fxpeft_gates
    with gm.disable_adapters():
        assert (lengths(gm), lengths(fused), lengths(twin)) == (plain, plain, longer)
    assert pickle.loads(pickle.dumps(gm.fxpeft_gates)).opened == {"default"}
    gm.add_adapter("other", RULES)
    assert gm.fxpeft_gates.opened == {"default"} == set(gm.active_adapters)
    gm.set_adapter(["default", "other"])
    assert gm.fxpeft_gates.opened == {"default", "other"} == set(gm.active_adapters)
    assert lengths(gm) == plain + 2 * (longer - plain)  # both prompts stack
    gm.delete_adapter("other")
    assert gm.fxpeft_gates.opened == {"default"} and lengths(gm) == longer


# --- generate numbers positions as the forward does (PEFT drops position_ids) ----------------

def _peft_greedy(peft_model, ids, mask, steps):
    """PEFT's greedy tokens from its forward, step by step (what its cached generate computes
    on transformers 5.23; 5.25's generate re-feeds the prompt embeddings each step)."""
    for _ in range(steps):
        with torch.no_grad():
            token = peft_model(input_ids=ids, attention_mask=mask).logits[:, -1].argmax(-1)
        ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids


def _peft_generate_is_cached_correctly() -> bool:
    import transformers
    from packaging.version import Version
    return Version(transformers.__version__) < Version("5.25")


@pytest.mark.parametrize("build", [lambda: tiny_gpt2(initializer_range=0.3), tiny_opt], ids=["gpt2", "opt"])
def test_generate_numbers_positions_as_the_forward_on_left_padded_rows(build, tmp_path):
    """GPT-2 has absolute positions: a left-padded row's tokens depend on how the padding is
    counted. PEFT drops position_ids for prompt tuning, so the model counts every slot (OPT:
    its mask); fxpeft's generate does the same, and equals PEFT's on every row."""
    from peft import PromptTuningConfig, get_peft_model
    peft_model = get_peft_model(build(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    peft_model.save_pretrained(tmp_path)
    gm = fxpeft.load(build(), tmp_path)
    ids = torch.tensor([[1, 1, 1, 5, 6, 7], [9, 10, 11, 12, 13, 14]])
    mask = (torch.arange(6) >= torch.tensor([[3], [0]])).long()
    ours = fxpeft.generate(gm, ids, max_new_tokens=8, attention_mask=mask, eos_token_id=[])
    assert ours.tolist() == _peft_greedy(peft_model, ids, mask, 8).tolist()
    if _peft_generate_is_cached_correctly():
        theirs = peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8,
                                     do_sample=False, eos_token_id=None, pad_token_id=0)
        assert ours.tolist() == theirs.tolist()


def test_generate_counts_padding_slots_where_the_forward_does():
    """The decoding loop's numbering: transformers' (padding skipped) without virtual tokens,
    the model's own default (GPT-2: every slot) with them."""
    from fxpeft.generation.decoding import numbering
    gm = fxpeft.rewrite(tiny_gpt2(), RULES)
    mask = torch.tensor([[1, 1, 0, 1]])
    assert gm.capture_info.positions == "counting"
    assert numbering(gm, True)(mask).tolist() == [[0, 1, 2, 3]]
    assert numbering(gm, False)(mask).tolist() == [[0, 1, 1, 2]]
