"""fxpeft.generate: KV-cached decoding of adapted causal LMs, against PEFT's generate.

Greedy tokens are compared exactly (fp32 tiny Llama; the cached graph and PEFT's eager model
compute the same logits up to ~1e-6, far below the gaps between the top two logits here). The
decode graph must carry the same adapter nodes as the training graph and *share* its adapter
parameters and gates.
"""

import pytest
import torch

import fxpeft
from conftest import VOCAB, tiny_llama, token_batch
from fxpeft.generation import decode_graph
from fxpeft.graph.records import adapter_parameters, record
from fxpeft.graph.state import graph_state
from fxpeft.graph.targets import fetch
from fxpeft.errors import FxpeftError
from fxpeft.registry import is_adapter_parameter
from fxpeft.names import ADAPTER_META, GATES

RULES = {"lora": "lora_qv.toml", "dora": "dora_qv.toml", "ia3": "ia3.toml",
         "adaption_prompt": "llama_adapter.toml", "modules_to_save": "lora_qv.toml"}
NEW_TOKENS = 8


def _perturb(gm, seed=3, scale=0.3):
    """Move every adapter tensor off its identity init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if is_adapter_parameter(name):
                param.add_(torch.randn(param.shape, generator=generator) * scale)


def _adapted(kind, seed=3):
    model = tiny_llama()
    keep = ["lm_head"] if kind == "modules_to_save" else ()
    gm = fxpeft.rewrite(model, RULES[kind], modules_to_save=keep)
    _perturb(gm, seed)
    return gm.eval()


def _left_padded(batch=3, seq=9, seed=1):
    ids = torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for row, pad in enumerate([3, 0, 5][:batch]):
        mask[row, :pad], ids[row, :pad] = 0, 0
    return ids, mask


def _peft_twin(gm, tmp_path):
    """PEFT's model, loaded from the adapter folder fxpeft saved."""
    from peft import PeftModel
    fxpeft.save(gm, tmp_path / "adapter")
    return PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter").eval()


def _decoder(gm, ids):
    return decode_graph.decoder_for(gm, ids.shape[0], ids.shape[1] + NEW_TOKENS)


@pytest.mark.parametrize("kind", list(RULES))
def test_greedy_tokens_equal_peft_generate_with_left_padding(kind, tmp_path):
    gm = _adapted(kind)
    ids, mask = _left_padded()
    ours = fxpeft.generate(gm, ids, max_new_tokens=NEW_TOKENS, attention_mask=mask)
    theirs = _peft_twin(gm, tmp_path).generate(input_ids=ids, attention_mask=mask,
                                                max_new_tokens=NEW_TOKENS, do_sample=False)
    assert ours.shape == (3, 9 + NEW_TOKENS)
    assert torch.equal(ours, theirs)
    with gm.disable_adapters():
        assert not torch.equal(fxpeft.generate(gm, ids, max_new_tokens=NEW_TOKENS, attention_mask=mask), ours)


@pytest.mark.parametrize("kind", list(RULES))
def test_an_identity_adapter_generates_the_base_models_own_tokens(kind):
    """At init every kind is the identity, so greedy decoding must give the base model's own
    ``generate`` tokens, on every transformers version in range (5.23 names the cache keyword
    ``past_key_values``, 5.25 ``cache``: a wrong one leaves the KV cache unwritten)."""
    model = tiny_llama().eval()
    keep = ["lm_head"] if kind == "modules_to_save" else ()
    gm = fxpeft.rewrite(tiny_llama(), RULES[kind], modules_to_save=keep).eval()
    ids, mask = _left_padded()
    ours = fxpeft.generate(gm, ids, max_new_tokens=NEW_TOKENS, attention_mask=mask)
    theirs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                            do_sample=False)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("kind", ["lora", "adaption_prompt", "modules_to_save"])
def test_decode_graph_has_the_same_adapter_nodes_and_shares_parameters(kind):
    gm = _adapted(kind)
    ids, _ = _left_padded()
    decoder = _decoder(gm, ids)
    sites = lambda g: {(r.kind, r.module_path) for n in g.graph.nodes  # noqa: E731
                       if (r := n.meta.get(ADAPTER_META)) is not None}
    assert sites(decoder) == sites(gm) and sites(gm)  # node counts differ: the decoder is slimmed
    for target in record(gm, "default").attached:
        assert fetch(decoder, target) is fetch(gm, target)
    assert getattr(decoder, GATES) is getattr(gm, GATES)
    decoder_params = {id(p) for p in decoder.parameters()}
    assert all(id(p) in decoder_params for p in adapter_parameters(gm, "default"))
    assert {id(p) for p in gm.parameters()} >= decoder_params  # nothing of its own but the KV cache
    decoder.graph.lint()


def test_decode_graph_attends_grouped_heads_on_the_cache_and_drops_training_nodes():
    """The decode step does no work PEFT's eager step does not: SDPA reads the KV cache itself
    (``enable_gqa``, no repeated copy), no dropout, the LoRA scale on the gate, q/v LoRA ``A``
    in one matmul, each RMSNorm one ``rms_norm``. Tokens stay PEFT's (test above)."""
    gm = _adapted("lora")
    decoder = _decoder(gm, _left_padded()[0])
    aten = torch.ops.aten
    sdpa = [n for n in decoder.graph.nodes if n.target is aten.scaled_dot_product_attention.default]
    assert len(sdpa) == 2 and all(n.kwargs.get("enable_gqa") for n in sdpa)
    for node in sdpa:  # k and v: the cache itself, 2 kv heads for 4 query heads
        assert [a.target for a in node.args[1:3]] == [aten.index_copy_.default] * 2
        assert node.args[0].meta["val"].shape[1] == 4 and node.args[1].meta["val"].shape[1] == 2
    assert not any(n.target is aten.expand.default and n.args[0].target is aten.unsqueeze.default
                   and n.args[0].args[0].target is aten.index_copy_.default for n in decoder.graph.nodes)
    assert not [n for n in decoder.graph.nodes if n.op == "call_module"]  # no dropout
    matmuls = lambda g: len(g.graph.find_nodes(op="call_function", target=aten.linear.default))  # noqa: E731
    assert (matmuls(gm), matmuls(decoder)) == (2 * (7 + 4) + 1, 2 * (7 + 3) + 1)  # per layer: 7 base,
    # LoRA A q, A v, B q, B v (one A in the decoder); and the head
    ups = [n for n in decoder.graph.nodes if n.target is aten.linear.default
           and n.args[1].op == "get_attr" and "lora_B" in n.args[1].target]
    assert len(ups) == 4 and all(user.target is aten.add.Tensor for n in ups for user in n.users)  # no
    # scale multiply on the B output: alpha / r rides the 0-d gate
    norms = decoder.graph.find_nodes(op="call_function", target=aten.rms_norm.default)
    assert len(norms) == 2 * 2 + 1 and not decoder.graph.find_nodes(op="call_function", target=aten.rsqrt.default)


def test_sampling_with_a_fixed_seed_is_reproducible_and_equals_peft(tmp_path):
    gm = _adapted("lora")
    ids, mask = _left_padded()
    knobs = dict(max_new_tokens=NEW_TOKENS, do_sample=True, temperature=0.8, top_k=20, top_p=0.9,
                 attention_mask=mask)
    first = fxpeft.generate(gm, ids, generator=torch.Generator().manual_seed(7), **knobs)
    again = fxpeft.generate(gm, ids, generator=torch.Generator().manual_seed(7), **knobs)
    other = fxpeft.generate(gm, ids, generator=torch.Generator().manual_seed(8), **knobs)
    assert torch.equal(first, again) and not torch.equal(first, other)
    torch.manual_seed(11)
    ours = fxpeft.generate(gm, ids, **knobs)
    peft_model = _peft_twin(gm, tmp_path)
    torch.manual_seed(11)
    theirs = peft_model.generate(input_ids=ids, **knobs)
    assert torch.equal(ours, theirs)  # same warpers, same draws from the global generator


def _greedy_without_cache(gm, ids, steps):
    """The reference loop: the whole sequence through the training graph per token."""
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, gm(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def test_train_generate_train_needs_no_copy():
    torch.manual_seed(0)
    gm = _adapted("lora")
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=0.5)
    trained = [p for p in gm.parameters() if p.requires_grad]

    def step():
        gm.train()
        gm(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        gm.eval()

    step()
    first = fxpeft.generate(gm, ids, max_new_tokens=NEW_TOKENS, eos_token_id=[])
    assert torch.equal(first, _greedy_without_cache(gm, ids, NEW_TOKENS))
    decoder = _decoder(gm, ids)
    before = [p.detach().clone() for p in trained]
    for _ in range(3):
        step()
    assert all(not torch.equal(a, b) for a, b in zip(before, trained))
    assert _decoder(gm, ids) is decoder  # not rebuilt: it reads the same parameter objects
    later = fxpeft.generate(gm, ids, max_new_tokens=NEW_TOKENS, eos_token_id=[])
    assert torch.equal(later, _greedy_without_cache(gm, ids, NEW_TOKENS))
    assert not torch.equal(later, first)
    assert all(p.grad is None for p in trained)  # generation built no graph for autograd
    assert gm.graph is not decoder.graph and gm.training is False


def test_named_adapters_and_disable_adapters_are_respected():
    model = tiny_llama()
    gm = fxpeft.rewrite(model, "lora_qv.toml")
    fxpeft.add_adapter(gm, "other", "ia3.toml")
    _perturb(gm, seed=3)
    gm.eval()
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    run = lambda: fxpeft.generate(gm, ids, max_new_tokens=NEW_TOKENS, eos_token_id=[])
    default = run()
    assert torch.equal(default, _greedy_without_cache(gm, ids, NEW_TOKENS))
    gm.set_adapter("other")
    other = run()
    assert torch.equal(other, _greedy_without_cache(gm, ids, NEW_TOKENS)) and not torch.equal(other, default)
    with gm.disable_adapters():
        base = run()
    plain = tiny_llama().generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    assert torch.equal(base, plain)
    assert torch.equal(run(), other)  # the gates came back


def test_decode_graphs_are_cached_and_rebuilt_when_adapters_change():
    gm = _adapted("lora")
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    fxpeft.generate(gm, ids, max_new_tokens=NEW_TOKENS)
    first = _decoder(gm, ids)
    fxpeft.generate(gm, ids, max_new_tokens=NEW_TOKENS + 4)  # the same cache length (32)
    assert _decoder(gm, ids) is first and len(decode_graph.cached_keys(gm)) == 1
    fxpeft.add_adapter(gm, "more", "ia3.toml")
    assert _decoder(gm, ids) is not first
    assert any(r.kind == "ia3" for n in _decoder(gm, ids).graph.nodes
               if (r := n.meta.get(ADAPTER_META)) is not None)


def test_bad_inputs_are_one_line_errors():
    gm = _adapted("lora")
    with pytest.raises(FxpeftError, match="input_ids must be an integer tensor"):
        fxpeft.generate(gm, torch.zeros(2, 3))
    with pytest.raises(FxpeftError, match="attention_mask has shape"):
        fxpeft.generate(gm, torch.ones(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 4))
    with pytest.raises(FxpeftError, match="max_new_tokens must be a positive integer"):
        fxpeft.generate(gm, torch.ones(2, 3, dtype=torch.long), max_new_tokens=0)
    plain = fxpeft.rewrite(torch.nn.Sequential(torch.nn.Linear(4, 4)),
                           fxpeft.rules.Rule(where=fxpeft.rules.Where(path=["0"])))
    with pytest.raises(FxpeftError, match="needs a graph captured from a transformers causal LM"):
        fxpeft.generate(plain, torch.ones(1, 3, dtype=torch.long))


def test_prompt_tuning_prefills_its_virtual_tokens_once_and_equals_peft_greedy(tmp_path):
    """The decode graph takes prompt tuning's virtual tokens as ids past the vocabulary, which
    the prefill puts in front once (the KV cache keeps them); greedy tokens equal PEFT's model's
    over full forwards. (PEFT's cached ``generate`` parted from both after two tokens in one row
    of this random tiny model.)"""
    gm = fxpeft.rewrite(tiny_llama(), "prompt_tuning.toml")
    _perturb(gm)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    assert decode_graph.without_kv_cache(gm) == {}
    ours = fxpeft.generate(gm.train(), ids, max_new_tokens=NEW_TOKENS)
    assert gm.training  # mode kept
    decoder = decode_graph.decoder_for(gm, 2, 9 + NEW_TOKENS + 20)  # 20 virtual tokens: built
    assert graph_state(decoder).virtual_tokens == {"default": range(VOCAB, VOCAB + 20)}
    assert decoder.prompt_embeddings is gm.prompt_embeddings and len(decode_graph.cached_keys(gm)) == 1
    peft_model, theirs = _peft_twin(gm, tmp_path), ids
    with torch.no_grad():  # PEFT's model, greedy over full forwards (the same computation)
        for _ in range(NEW_TOKENS):
            theirs = torch.cat([theirs, peft_model(input_ids=theirs).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert ours.shape == (2, 9 + NEW_TOKENS) and torch.equal(ours, theirs)
    with gm.disable_adapters():  # no virtual tokens: the base model's own generate
        base = fxpeft.generate(gm, ids, max_new_tokens=NEW_TOKENS, eos_token_id=[])
    assert torch.equal(base, tiny_llama().generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                                                   eos_token_id=None))
    assert not torch.equal(base, ours)


def test_two_prompt_adapters_generate_without_the_kv_cache():
    """Two active prompt-tuning adapters stack their virtual tokens in the training graph; the
    decode graph holds one, so generation runs full forwards of the training graph instead."""
    gm = fxpeft.rewrite(tiny_llama(), "prompt_tuning.toml")
    fxpeft.add_adapter(gm, "more", "prompt_tuning.toml")
    gm.set_adapter(["default", "more"])
    _perturb(gm)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    assert set(decode_graph.without_kv_cache(gm)) == {"default", "more"}
    ours = fxpeft.generate(gm.eval(), ids, max_new_tokens=NEW_TOKENS, eos_token_id=[])
    assert decode_graph.cached_keys(gm) == [] and torch.equal(ours, _greedy_without_cache(gm, ids, NEW_TOKENS))
