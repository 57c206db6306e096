"""The HF-model face of an adapted graph: the attributes transformers, TRL and accelerate read,
``save_pretrained``, gradient checkpointing, and ``gm.generate(**tokenizer(...))`` against
``fxpeft.generate``, PEFT's ``generate`` and transformers' own sampling."""

import pytest
import torch

import fxpeft
from conftest import VOCAB, tiny_bert, tiny_llama, word_texts, word_tokenizer
from fxpeft.registry import is_adapter_parameter
from fxpeft.runtime.hf_face import REQUIRE_GRAD_META, require_grad
from fxpeft.rules import Rule, Where

RULES = {"lora": "lora_qv.toml", "dora": "dora_qv.toml", "ia3": "ia3.toml",
         "adaption_prompt": "llama_adapter.toml"}
NEW = 6


def _perturbed(gm, seed=3, scale=0.3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if is_adapter_parameter(name):
                param.add_(torch.randn(param.shape, generator=generator) * scale)
    return gm.eval()


def _plain_graph():
    return fxpeft.rewrite(torch.nn.Sequential(torch.nn.Linear(2, 2)), Rule(where=Where(path=["0"])))


def _prompts():
    tokenizer = word_tokenizer()
    return tokenizer, tokenizer(word_texts(3, words=7, seed=2), padding=True, return_tensors="pt")


def test_attributes_are_the_base_models_own_objects():
    model = tiny_llama()
    model.config._name_or_path = "/models/tiny"
    gm = fxpeft.rewrite(model, "lora_qv.toml")
    assert gm.config is model.config and gm.generation_config is model.generation_config
    assert (gm.name_or_path, gm.main_input_name) == ("/models/tiny", "input_ids")
    assert (gm.dtype, gm.device, gm.can_generate()) == (torch.float32, torch.device("cpu"), True)
    assert gm.get_input_embeddings().weight is model.model.embed_tokens.weight
    assert gm.get_output_embeddings().weight is model.lm_head.weight
    gm.config.pad_token_id = 0  # one object: a change is seen by both sides
    assert model.config.pad_token_id == 0
    from transformers import GenerationConfig
    gm.generation_config = GenerationConfig(max_new_tokens=3)
    assert gm.generation_config.max_new_tokens == 3


def test_a_classifier_has_no_output_embeddings_and_cannot_generate():
    gm = fxpeft.rewrite(tiny_bert(), Rule(where=Where(path=[r"\.(query|value)$"])))
    assert gm.get_output_embeddings() is None and gm.can_generate() is False
    assert gm.config.num_labels == 3
    with pytest.raises(fxpeft.FxpeftError, match="^generation needs|is not a causal LM"):
        gm.generate(input_ids=torch.tensor([[1, 2]]))


@pytest.mark.parametrize("attribute", ["config", "generation_config", "name_or_path", "main_input_name"])
def test_a_graph_of_a_plain_module_refuses_hf_attributes_naming_them(attribute):
    gm = _plain_graph()
    assert not hasattr(gm, attribute)
    with pytest.raises(AttributeError) as caught:
        getattr(gm, attribute)
    message = str(caught.value)
    assert f"AdaptedSequential.{attribute}:" in message and "\n" not in message
    assert gm.can_generate() is False
    with pytest.raises(fxpeft.FxpeftError, match=r"^AdaptedSequential\.get_input_embeddings: .*not a transformers model"):
        gm.get_input_embeddings()


def test_print_trainable_parameters_prints_peft_line(capsys):
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv.toml")
    gm.print_trainable_parameters()
    trainable, total = fxpeft.trainable_parameters(gm)
    assert capsys.readouterr().out == (f"trainable params: {trainable:,d} || all params: {total:,d} || "
                                       f"trainable%: {100 * trainable / total:.4f}\n")


def test_save_pretrained_writes_every_adapter_in_peft_layout_that_peft_reads(tmp_path):
    from peft import PeftModel
    gm = _perturbed(fxpeft.rewrite(tiny_llama(), "lora_qv.toml"))
    gm.add_adapter("other", "lora_qv.toml")
    (tmp_path / "tokenizer.json").write_text("{}")  # other files in the folder stay
    gm.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "fxpeft_rules.toml", "other", "tokenizer.json"]
    assert (tmp_path / "other" / "adapter_model.safetensors").exists()
    ids = torch.tensor([[5, 6, 7, 8]])
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(peft_model(ids).logits, gm(ids).logits, rtol=0, atol=1e-5)
    for bad, match in (({"safe_serialization": False}, "safe_serialization=False"),
                       ({"max_shard_size": "1GB"}, "unknown keyword 'max_shard_size'")):
        with pytest.raises(fxpeft.FxpeftError, match=match):
            gm.save_pretrained(tmp_path / "x", **bad)
    assert not (tmp_path / "x").exists()


def _loss_and_grads(gm, batch):
    torch.manual_seed(0)
    gm.zero_grad()
    loss = gm(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in gm.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_enable_runs_the_checkpointed_copy_with_the_same_gradients():
    gm = _perturbed(fxpeft.rewrite(tiny_llama(), "lora_qv.toml", dropout=0.1)).train()
    ids = torch.randint(4, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    plain = _loss_and_grads(gm, batch)
    gm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    assert gm.is_gradient_checkpointing and gm.is_activation_checkpointing
    copy = fxpeft.transforms.fuse.checkpointed_copy(gm)
    assert len(copy.get_submodule("_fxpeft_checkpointed")._modules) == 2  # one region per layer
    checked = _loss_and_grads(gm, batch)
    assert torch.equal(plain[0], checked[0])  # dropout masks recompute the same
    for name, grad in plain[1].items():
        torch.testing.assert_close(checked[1][name], grad, rtol=0, atol=1e-7)
    gm.gradient_checkpointing_disable()
    assert not gm.is_gradient_checkpointing
    with pytest.raises(fxpeft.FxpeftError, match="^AdaptedLlamaForCausalLM.gradient_checkpointing_enable: offload"):
        gm.activation_checkpointing_enable(offload=True)


def test_gradient_checkpointing_follows_adapters_added_later():
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv.toml").train()
    gm.gradient_checkpointing_enable()
    gm.add_adapter("sql", "lora_qv.toml")
    gm.set_adapter("sql")
    ids = torch.tensor([[5, 6, 7, 8]])
    gm(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in gm.named_parameters() if "lora_A_sql" in n)


def test_enable_input_require_grads_marks_the_embedding_output():
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv.toml")
    ids = torch.tensor([[5, 6, 7]])
    before = gm(ids).logits
    gm.enable_input_require_grads()
    gm.enable_input_require_grads()  # once is enough
    marked = [n for n in gm.graph.nodes if n.meta.get(REQUIRE_GRAD_META)]
    assert len(marked) == 1 and marked[0].target is require_grad
    assert marked[0].args[0].target == torch.ops.aten.embedding.default
    gm.graph.lint()
    torch.testing.assert_close(gm(ids).logits, before, rtol=0, atol=0)
    gm.disable_input_require_grads()
    assert not [n for n in gm.graph.nodes if n.meta.get(REQUIRE_GRAD_META)]


@pytest.mark.parametrize("kind", list(RULES))
def test_generate_from_tokenizer_output_equals_fxpeft_generate_and_peft(kind, tmp_path):
    from peft import PeftModel
    tokenizer, batch = _prompts()
    gm = _perturbed(fxpeft.rewrite(tiny_llama(), RULES[kind]))
    ours = gm.generate(**batch, max_new_tokens=NEW)
    assert torch.equal(ours, fxpeft.generate(gm, batch["input_ids"], NEW, attention_mask=batch["attention_mask"]))
    gm.save_pretrained(tmp_path)
    theirs = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval().generate(**batch, max_new_tokens=NEW)
    assert ours.shape == (3, batch["input_ids"].shape[1] + NEW) and torch.equal(ours, theirs)


def test_seeded_sampling_equals_transformers_own_sampling():
    model = tiny_llama()
    gm = fxpeft.rewrite(model, "lora_qv.toml").eval()  # identity adapter: the base model's logits
    _, batch = _prompts()
    knobs = dict(max_new_tokens=NEW, do_sample=True, temperature=0.7, top_k=12, top_p=0.9)
    for seed in (1, 2):
        torch.manual_seed(seed)
        ours = gm.generate(**batch, **knobs)
        torch.manual_seed(seed)
        assert torch.equal(ours, model.generate(**batch, **knobs))


def test_max_length_eos_pad_and_stopping_follow_transformers():
    from transformers import GenerationConfig
    model = tiny_llama()
    gm = fxpeft.rewrite(model, "lora_qv.toml").eval()
    tokenizer, batch = _prompts()
    prompt = batch["input_ids"].shape[1]
    assert gm.generate(**batch).shape[1] == 20  # transformers' default max_length
    assert gm.generate(**batch, max_length=prompt + 3).shape[1] == prompt + 3
    greedy = model.generate(**batch, max_new_tokens=NEW)
    eos = int(greedy[0, prompt + 1])  # row 0 ends at its second new token
    config = GenerationConfig(max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)
    ours = gm.generate(**batch, generation_config=config)
    assert torch.equal(ours, model.generate(**batch, generation_config=config))
    word = tokenizer.decode(greedy[1, prompt + 1:prompt + 2])  # row 1 stops at its second token
    stop = gm.generate(**batch, max_new_tokens=NEW, stop_strings=word, tokenizer=tokenizer)
    assert torch.equal(stop, model.generate(**batch, max_new_tokens=NEW, stop_strings=word, tokenizer=tokenizer))
    assert not torch.equal(stop, greedy)

    def second_token_is(token):
        return lambda ids, scores: (ids[:, prompt + 1] == token) if ids.shape[1] > prompt + 1 \
            else torch.zeros(ids.shape[0], dtype=torch.bool)
    from transformers import StoppingCriteriaList
    criteria = StoppingCriteriaList([second_token_is(int(greedy[2, prompt + 1]))])
    ours = gm.generate(**batch, max_new_tokens=NEW, stopping_criteria=criteria)
    assert torch.equal(ours, model.generate(**batch, max_new_tokens=NEW, stopping_criteria=criteria))


def test_a_streamer_sees_the_prompt_then_each_token():
    class Recorder:
        def __init__(self):
            self.seen, self.ended = [], False

        def put(self, value):
            self.seen.append(value)

        def end(self):
            self.ended = True
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv.toml").eval()
    _, batch = _prompts()
    streamer = Recorder()
    out = gm.generate(**{k: v[:1] for k, v in batch.items()}, max_new_tokens=3, streamer=streamer)
    assert streamer.ended and torch.equal(torch.cat([s.reshape(1, -1) for s in streamer.seen], 1), out)


@pytest.mark.parametrize("knob, shown", [({"num_beams": 3}, "num_beams=3"),
                                         ({"repetition_penalty": 1.2}, "repetition_penalty=1.2"),
                                         ({"num_return_sequences": 2}, "num_return_sequences"),
                                         ({"return_dict_in_generate": True}, "return_dict_in_generate=True"),
                                         ({"foo": 1}, "unknown keyword 'foo'"),
                                         ({"stop_strings": "w5"}, "stop_strings needs tokenizer=")])
def test_what_generate_cannot_honour_is_a_one_line_error_naming_it(knob, shown):
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv.toml").eval()
    _, batch = _prompts()
    with pytest.raises(fxpeft.FxpeftError) as caught:
        gm.generate(**batch, **knob)
    assert str(caught.value).startswith("generate: ") and shown in str(caught.value)
    assert "\n" not in str(caught.value)


def test_base_model_returns_the_head_input_and_refuses_an_adapted_head():
    model = tiny_llama()
    gm = _perturbed(fxpeft.rewrite(model, "lora_qv.toml"))
    ids = torch.tensor([[5, 6, 7, 8]])
    backbone = gm.base_model
    hidden = backbone(input_ids=ids).last_hidden_state
    torch.testing.assert_close(model.lm_head(hidden), gm(ids).logits, rtol=0, atol=1e-6)
    assert backbone is gm.base_model and not any("lm_head" in str(n.target) for n in backbone.graph.nodes)
    kept = fxpeft.rewrite(tiny_llama(), "lora_qv.toml", modules_to_save=["lm_head"])
    with pytest.raises(fxpeft.FxpeftError, match=r"^AdaptedLlamaForCausalLM.base_model: adapter 'default' adapts the LM head"):
        kept.base_model
    with pytest.raises(AttributeError, match="base_model: fxpeft builds it for causal LMs"):
        fxpeft.rewrite(tiny_bert(), Rule(where=Where(path=[r"\.(query|value)$"]))).base_model
