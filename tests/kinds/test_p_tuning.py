"""P-tuning: the graph it builds (prompt tuning's placement, fed by a prompt encoder called once
per forward), its encoder against PEFT's (MLP and LSTM, forward, gradients and training steps),
PEFT's file layout both ways (the encoded prompt, no encoder) on Llama (GQA), GPT-2 and Qwen2,
KV-cached greedy generate against PEFT's, and the guarantees every kind carries.

The PEFT config is the one of PEFT's decoder-model test matrix (``num_virtual_tokens=10``,
``encoder_hidden_size=32``; PEFT's custom-model cases hold no P_TUNING case), with the LSTM
encoder as a second case."""

import json

import pytest
import torch

import fxpeft
from kind_checks import check_compiles_whole, check_switching_compiles_once_per_state
from conftest import (REPO_ROOT, VOCAB, adapter_nodes, assert_only_adapters_get_grads, emitted_base,
                      tiny_gpt2, tiny_llama, tiny_qwen2, token_batch, train)
from fxpeft.errors import FxpeftError, RuleError
from fxpeft.generation import decode_graph
from fxpeft.io.serialize import restore
from fxpeft.graph.state import graph_state
from fxpeft.kinds.p_tuning import LstmHead, PTuningParams
from fxpeft.names import adapter_node
from fxpeft.rules import Rule

RULES = str(REPO_ROOT / "passes" / "p_tuning.toml")
FAMILIES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "qwen2": tiny_qwen2}
LENGTH, HIDDEN = 10, 32
ENCODERS = ["MLP", "LSTM"]


def _rule(encoder="MLP", **params):
    return Rule(match="input_embedding", params=PTuningParams(
        num_virtual_tokens=LENGTH, encoder=encoder.lower(), encoder_hidden_size=HIDDEN, **params))


def _peft_model(build, encoder="MLP", **fields):
    """PEFT's P-tuning model (training form: the encoder runs in its forward), seeded."""
    from peft import PromptEncoderConfig, get_peft_model
    config = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=LENGTH,
                                 encoder_hidden_size=HIDDEN, encoder_reparameterization_type=encoder,
                                 **fields)
    torch.manual_seed(5)
    return get_peft_model(build(), config)


def _twin(build, encoder="MLP", **fields):
    """PEFT's model and an fxpeft graph holding the same encoder weights."""
    peft_model = _peft_model(build, encoder, **fields)
    gm = fxpeft.rewrite(build(), _rule(encoder, **fields))
    gm.prompt_encoder.load_state_dict(peft_model.prompt_encoder["default"].state_dict())
    return peft_model, gm


def _batch(seed=1):
    ids = token_batch(batch=3, seq=9, seed=seed)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


def _outputs(model, ids, mask, labels):
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    return out.logits, out.loss


def _assert_same(ours, theirs, atol=1e-5):
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=atol)


# --- the graph -------------------------------------------------------------------------------

def test_llama_graph_calls_the_encoder_once_and_places_its_prompt_as_prompt_tuning():
    model = tiny_llama()
    gm = fxpeft.rewrite(model, RULES)
    gm.graph.lint()
    added = adapter_nodes(gm, "p_tuning")
    names = [n.target if n.op == "call_module" else n.target.__name__ for n in added]
    assert names == ["getitem", "prepend_mask", "prepend_ids", "fxpeft_training", "prompt_encoder",
                     "place_prompt", "prepend_labels"]
    assert [n for n in added if adapter_node(n).removable] == [added[i] for i in (1, 2, 5, 6)]
    assert all(adapter_node(n).detail is None for n in added) and len(gm.graph.nodes) == len(
        emitted_base(model).graph.nodes) + len(added) + 2  # + the gates module and gate_open
    assert added[5].args[1] is added[4]  # the encoder's one output feeds the placement
    trainable = {n: tuple(p.shape) for n, p in gm.named_parameters() if p.requires_grad}
    assert trainable == {"prompt_encoder.embedding.weight": (20, 64),
                         "prompt_encoder.mlp_head.0.weight": (128, 64), "prompt_encoder.mlp_head.0.bias": (128,),
                         "prompt_encoder.mlp_head.2.weight": (128, 128), "prompt_encoder.mlp_head.2.bias": (128,),
                         "prompt_encoder.mlp_head.4.weight": (64, 128), "prompt_encoder.mlp_head.4.bias": (64,)}
    assert fxpeft.explain(model, RULES).rules[0].matched == ["model.embed_tokens"]


@pytest.mark.parametrize("encoder", ENCODERS)
def test_encoder_forward_and_gradients_equal_peft(encoder):
    """The same encoder weights: logits, loss and every encoder gradient as PEFT's training form."""
    peft_model, gm = _twin(tiny_llama, encoder)
    batch = _batch()
    ours, theirs = _outputs(gm.train(), *batch), _outputs(peft_model.train(), *batch)
    _assert_same(ours, theirs)
    ours[1].backward()
    theirs[1].backward()
    assert_only_adapters_get_grads(gm)
    peft_grads = {n: p.grad for n, p in peft_model.prompt_encoder["default"].named_parameters()}
    for name, param in gm.prompt_encoder.named_parameters():
        torch.testing.assert_close(param.grad, peft_grads[name], rtol=0, atol=1e-5)


def test_training_lowers_the_loss_step_for_step_as_peft():
    peft_model, gm = _twin(tiny_llama, "LSTM")
    ids, mask, labels = _batch()
    step = lambda m: m(input_ids=ids, attention_mask=mask, labels=labels).loss  # noqa: E731
    ours, theirs = train(gm.train(), step, 8, lr=1e-2), train(peft_model.train(), step, 8, lr=1e-2)
    assert all(b < a for a, b in zip(ours, ours[1:])) and ours[-1] < ours[0] - 0.1, ours
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=0, atol=1e-4)


def test_lstm_dropout_follows_the_graphs_mode():
    gm = fxpeft.rewrite(tiny_llama(), _rule("LSTM", encoder_num_layers=2, encoder_dropout=0.5))
    ids = token_batch()
    torch.manual_seed(0)
    first, second = gm.train()(ids).logits, gm(ids).logits
    assert not torch.equal(first, second)  # dropout between the LSTM layers
    gm.prompt_encoder.eval()  # as a decode graph sharing the encoder leaves it: the graph's mode rules
    assert not torch.equal(gm(ids).logits, gm(ids).logits)
    gm.eval()
    torch.testing.assert_close(gm(ids).logits, gm(ids).logits, rtol=0, atol=0)


def test_compiles_whole_forward_and_backward():
    """``torch.compile`` cannot trace ``nn.LSTM``; the encoder runs ``torch.lstm`` on its own
    parameters, and the on/off switch is a guarded Python bool (the gates' mirror), so the
    graph compiles as one frame (``fullgraph=True``), as a LoRA graph does."""
    check_compiles_whole(fxpeft.rewrite(tiny_llama(num_hidden_layers=1), _rule("LSTM")), token_batch())


def test_switching_under_fullgraph_compiles_once_per_state():
    model = tiny_llama(num_hidden_layers=1)
    check_switching_compiles_once_per_state(model, fxpeft.rewrite(model, _rule("MLP")), token_batch())


# --- PEFT's files, both ways --------------------------------------------------------------------

@pytest.mark.parametrize("family, encoder", [("llama", "MLP"), ("llama", "LSTM"), ("gpt2", "MLP"),
                                             ("qwen2", "LSTM")])
def test_peft_folder_loads_into_fxpeft_with_equal_outputs(family, encoder, tmp_path):
    """PEFT saves the encoded prompt; fxpeft loads it into PEFT's inference form (a table)."""
    build = FAMILIES[family]
    peft_model = _peft_model(build, encoder).eval()
    batch = _batch()
    expected = _outputs(peft_model, *batch)
    peft_model.save_pretrained(tmp_path)
    gm = fxpeft.load(build(), tmp_path)
    _assert_same(_outputs(gm, *batch), expected)
    assert [n for n, _ in gm.prompt_encoder.named_parameters()] == ["embedding.weight"]
    assert not any(p.requires_grad for p in gm.parameters())
    assert abs(expected[1] - build()(input_ids=batch[0], attention_mask=batch[1], labels=batch[2]).loss) > 1e-3


@pytest.mark.parametrize("family, encoder", [("llama", "LSTM"), ("gpt2", "MLP"), ("qwen2", "MLP")])
def test_fxpeft_folder_loads_into_peft_with_equal_outputs(family, encoder, tmp_path):
    from peft import PeftModel
    build = FAMILIES[family]
    gm = fxpeft.rewrite(build(), _rule(encoder, encoder_num_layers=1) if encoder == "LSTM" else _rule())
    batch = _batch(seed=4)
    expected = _outputs(gm, *batch)
    fxpeft.save(gm, tmp_path)
    peft_model = PeftModel.from_pretrained(build(), tmp_path).eval()
    assert peft_model.peft_config["default"].encoder_reparameterization_type == encoder
    _assert_same(_outputs(peft_model, *batch), expected)
    _assert_same(_outputs(fxpeft.load(build(), tmp_path), *batch), expected)  # and fxpeft's own load


def test_saved_folder_holds_the_encoded_prompt_and_peft_config(tmp_path):
    from safetensors.torch import load_file
    gm = fxpeft.rewrite(tiny_llama(), _rule("LSTM", encoder_num_layers=3, encoder_dropout=0.1))
    fxpeft.save(gm, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert list(tensors) == ["prompt_embeddings"] and tensors["prompt_embeddings"].dtype == torch.float32
    torch.testing.assert_close(tensors["prompt_embeddings"], gm.prompt_encoder(training=False),
                               rtol=0, atol=1e-6)  # eval mode; saved without autograd
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {k: v for k, v in config.items() if k not in ("base_model_name_or_path", "revision")} == {
        "peft_type": "P_TUNING", "task_type": "CAUSAL_LM", "inference_mode": True,
        "num_virtual_tokens": LENGTH, "token_dim": 64, "num_transformer_submodules": 1,
        "num_attention_heads": 4, "num_layers": 2, "encoder_reparameterization_type": "LSTM",
        "encoder_hidden_size": HIDDEN, "encoder_num_layers": 3, "encoder_dropout": 0.1}
    trainable = fxpeft.load(tiny_llama(), tmp_path, trainable=True)  # the saved prompt's rows train
    assert [n for n, p in trainable.named_parameters() if p.requires_grad] == ["prompt_encoder.embedding.weight"]
    with pytest.raises(FxpeftError, match="holds the encoded prompt, not the encoder .*'default''s "
                                          "encoder cannot be restored"):
        restore(gm, tmp_path)


# --- adapters, fuse, merge, mixed batches, bf16 -------------------------------------------------

def test_named_adapters_switch_and_delete():
    model = tiny_llama()
    ids = token_batch()
    gm = fxpeft.rewrite(model, RULES)
    fxpeft.add_adapter(gm, "short", _rule("LSTM"))
    assert gm(ids).logits.shape[1] == ids.shape[1] + 20
    gm.set_adapter("short")
    assert gm(ids).logits.shape[1] == ids.shape[1] + LENGTH
    assert {n.split(".")[0] for n, p in gm.named_parameters() if p.requires_grad} == {"prompt_encoder_short"}
    gm.delete_adapter("short")
    assert not hasattr(gm, "prompt_encoder_short") and gm.active_adapters == []
    gm.delete_adapter("default")
    assert len(gm.graph.nodes) == len(emitted_base(model).graph.nodes)
    torch.testing.assert_close(gm(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_fuse_keeps_it_and_merge_and_mixed_batches_are_refused():
    gm = fxpeft.rewrite(tiny_llama(), _rule("LSTM"))
    batch = _batch()
    fused = fxpeft.fuse(gm)
    assert len(adapter_nodes(fused, "p_tuning")) == len(adapter_nodes(gm, "p_tuning"))
    _assert_same(_outputs(fused, *batch), _outputs(gm, *batch), atol=1e-6)
    with pytest.raises(FxpeftError, match="p_tuning adapter 'default' .* cannot be merged.*"
                                          "virtual tokens from its prompt encoder"):
        fxpeft.merge(gm)
    with pytest.raises(ValueError, match="p-tuning adapter is active.*cannot be mixed per sample"):
        gm.eval()(token_batch(batch=2), adapter_names=["default", "__base__"])


def test_bf16_base_keeps_an_fp32_encoder_as_peft(tmp_path):
    peft_model = _peft_model(lambda: tiny_llama().to(torch.bfloat16)).eval()
    ids = token_batch()
    theirs = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path)
    loaded = fxpeft.load(tiny_llama().to(torch.bfloat16), tmp_path)
    assert loaded.prompt_encoder.embedding.weight.dtype == torch.float32  # cast where it joins
    ours = loaded(ids).logits
    assert ours.dtype == theirs.dtype == torch.bfloat16
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-2)  # bf16 resolution (measured: 0)
    gm = fxpeft.rewrite(tiny_llama().to(torch.bfloat16), RULES)
    assert {p.dtype for p in gm.prompt_encoder.parameters()} == {torch.float32}
    gm.train()(ids, labels=ids).loss.backward()
    assert_only_adapters_get_grads(gm)


# --- generate ------------------------------------------------------------------------------------

def test_greedy_generate_prefills_the_encoded_prompt_once_and_equals_peft(tmp_path):
    """The decode graph shares the training graph's encoder and runs it at the prefill only.
    PEFT 0.21.2's cached ``generate`` re-injects the virtual tokens on transformers 5.25 (its
    tokens part from a full-forward greedy loop after a few steps here), so the tokens are
    compared with PEFT's ``use_cache=False`` generate."""
    from peft import PeftModel
    gm = fxpeft.rewrite(tiny_llama(), _rule("LSTM"))
    ids = torch.randint(3, VOCAB, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    for row, pad in enumerate([3, 0, 5]):
        mask[row, :pad], ids[row, :pad] = 0, 0
    calls = []
    gm.prompt_encoder.register_forward_hook(lambda *_: calls.append(1))
    ours = fxpeft.generate(gm.train(), ids, max_new_tokens=8, attention_mask=mask)
    assert gm.training and len(calls) == 1  # the prefill; no encoder run per token
    decoder = decode_graph.decoder_for(gm, 3, 9 + 8 + LENGTH)
    assert graph_state(decoder).virtual_tokens == {"default": range(VOCAB, VOCAB + LENGTH)}
    assert decoder.prompt_encoder is gm.prompt_encoder and len(decode_graph.cached_keys(gm)) == 1
    fxpeft.save(gm, tmp_path)
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    theirs = peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8,
                                 do_sample=False, use_cache=False)
    assert ours.shape == (3, 17) and torch.equal(ours, theirs)
    with gm.disable_adapters():
        assert not torch.equal(fxpeft.generate(gm, ids, max_new_tokens=8, attention_mask=mask), ours)


# --- errors ----------------------------------------------------------------------------------

def _write_config(folder, tensors=None, **fields):
    from safetensors.torch import save_file
    config = {"peft_type": "P_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4,
              "token_dim": 64, "num_transformer_submodules": 1, "encoder_hidden_size": 8,
              "encoder_reparameterization_type": "MLP", **fields}
    folder.mkdir(exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors or {"prompt_embeddings": torch.zeros(4, 64)}, str(folder / "adapter_model.safetensors"))
    return folder


@pytest.mark.parametrize("fields, tensors, message", [
    ({"encoder_reparameterization_type": "GRU"}, None, "encoder_reparameterization_type = 'GRU'; PEFT's are MLP, LSTM"),
    ({"encoder_hidden_size": None}, None, "encoder_hidden_size must be a positive integer, got None"),
    ({"num_virtual_tokens": 0}, None, "num_virtual_tokens must be a positive integer"),
    ({"encoder_reparameterization_type": "LSTM", "encoder_dropout": 1.5}, None,
     "params.encoder_dropout: expected a number in \\[0, 1\\)"),
    ({}, {"prompt_encoder.embedding.weight": torch.zeros(4, 64)},
     "holds one tensor, prompt_embeddings .*; this one holds \\['prompt_encoder.embedding.weight'\\]"),
])
def test_folders_it_cannot_honour_are_located_errors(fields, tensors, message, tmp_path):
    folder = _write_config(tmp_path / "adapter", tensors, **fields)
    with pytest.raises(FxpeftError, match=f"adapter_config.json: .*{message}"):
        fxpeft.load(tiny_llama(), folder)


def test_mlp_layers_and_dropout_peft_ignores_are_ignored_on_load_and_refused_in_rules(tmp_path):
    folder = _write_config(tmp_path / "adapter", encoder_num_layers=5, encoder_dropout=0.3)
    assert fxpeft.load(tiny_llama(), folder)(token_batch()).logits.shape[1] == 11 + 4
    with pytest.raises(RuleError, match="params.encoder_dropout: the MLP encoder has no dropout"):
        PTuningParams(encoder_dropout=0.1)
    with pytest.raises(RuleError, match="params.encoder: expected one of 'mlp', 'lstm'"):
        PTuningParams(encoder="gru")


def test_lstm_head_equals_torch_lstm():
    torch.manual_seed(0)
    head = LstmHead(8, 5, layers=2, dropout=0.0)
    lstm = torch.nn.LSTM(8, 5, num_layers=2, bidirectional=True, batch_first=True)
    lstm.load_state_dict(head.state_dict())
    x = torch.randn(1, 7, 8)
    torch.testing.assert_close(head(x, training=False), lstm(x)[0], rtol=0, atol=1e-6)
