"""``gm(**tokenizer(texts, padding=True, return_tensors="pt"))`` on RoBERTa, T5 and Llama graphs
(BERT: tests/runtime/test_reliability.py), with and without each optional input, against the eager model.

No tokenizer is loaded (offline): the batches are shaped as each family's tokenizer returns them,
padded with the config's pad id where the mask is 0 (right padding, and left padding for Llama
as generation pads). A rewritten graph with zero-init adapters must equal the eager model within
1e-5; with random adapters it must equal its merged graph, so the adapters see the same inputs.
"""

import itertools

import pytest
import torch

import fxpeft
from conftest import VOCAB, randomize_adapters, tiny_llama, tiny_t5, token_batch
from fxpeft.rules import Rule, Where

ATOL = 1e-5


def tiny_roberta():
    from transformers import RobertaConfig, RobertaForSequenceClassification
    torch.manual_seed(0)
    return RobertaForSequenceClassification(RobertaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=VOCAB, max_position_embeddings=64, num_labels=3, pad_token_id=1)).eval()


def padded(pad_id: int, left: bool = False, seed: int = 1) -> dict[str, torch.Tensor]:
    """A tokenizer-like batch of 3 rows of 4, 9 and 6 tokens: pad id where the mask is 0."""
    ids = token_batch(3, 9, seed).clamp(min=pad_id + 1)
    mask = torch.ones_like(ids)
    for row, length in enumerate((4, 9, 6)):
        pads = slice(0, 9 - length) if left else slice(length, 9)
        mask[row, pads], ids[row, pads] = 0, pad_id
    return {"input_ids": ids, "attention_mask": mask}


def subsets(batch: dict[str, torch.Tensor], optional: tuple[str, ...]):
    """``batch`` without each combination of its ``optional`` keys (the full batch first)."""
    for drop in itertools.chain.from_iterable(itertools.combinations(optional, n)
                                              for n in range(len(optional) + 1)):
        yield {k: v for k, v in batch.items() if k not in drop}


def graphs(model, rule):
    """The plain rewrite (zero-init adapters), a randomly adapted one, and its merge."""
    adapted = fxpeft.rewrite(model, rule).eval()
    randomize_adapters(adapted)
    return fxpeft.rewrite(model, rule).eval(), adapted, fxpeft.merge(adapted).eval()


def check_family(model, built, batch, optional, out=lambda o: o.logits):
    """Every subset of the batch: the plain rewrite equals eager, the adapted equals its merge;
    returns the adapted graph's outputs, in ``subsets`` order."""
    plain, adapted, merged = built
    seen = []
    with torch.no_grad():
        for inputs in subsets(batch, optional):
            torch.testing.assert_close(out(plain(**inputs)), out(model(**inputs)), rtol=0, atol=ATOL)
            seen.append(out(adapted(**inputs)))
            torch.testing.assert_close(seen[-1], out(merged(**inputs)), rtol=0, atol=ATOL)
    return seen


def test_roberta_graph_takes_what_its_tokenizer_returns():
    model = tiny_roberta()
    batch = padded(model.config.pad_token_id)
    batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])  # type_vocab_size 2: optional
    batch["token_type_ids"][:, 3:] = 1
    with_all, without_mask, without_types, bare = check_family(
        model, graphs(model, Rule(where=Where(path=[r"\.query$", r"\.value$"]))), batch,
        ("attention_mask", "token_type_ids"))
    # each optional input reaches the graph: dropping it changes the padded rows' logits
    assert (with_all - without_types).abs().max() > 1e-4
    assert (with_all[0] - without_mask[0]).abs().max() > 1e-4
    assert torch.allclose(with_all[1], without_mask[1], atol=ATOL)  # row 1 has no padding


def test_t5_graph_takes_what_its_tokenizer_returns_with_labels_or_decoder_ids():
    model = tiny_t5()
    batch = padded(model.config.pad_token_id)
    labels = token_batch(3, 5, seed=2).clamp(min=1)
    labels[0, 3:] = -100  # the tokenizer's text_target, padding replaced by -100 for the loss
    decoder_ids = model._shift_right(labels)
    built = graphs(model, Rule(where=Where(path=[r"\.q$", r"\.v$"])))
    for target in ({"labels": labels}, {"decoder_input_ids": decoder_ids},
                   {"decoder_input_ids": decoder_ids, "labels": labels}):
        with_mask, bare = check_family(model, built, {**batch, **target}, ("attention_mask",))
        assert (with_mask[0] - bare[0]).abs().max() > 1e-4
    loss = lambda o: o.loss[None]  # noqa: E731
    check_family(model, built, {**batch, "labels": labels}, ("attention_mask",), out=loss)


@pytest.mark.parametrize("left", [True, False], ids=["left-padded", "right-padded"])
def test_llama_graph_takes_what_its_tokenizer_returns(left):
    model = tiny_llama()
    batch = padded(0, left=left)
    built = graphs(model, "lora_qv.toml")
    with_mask, bare = check_family(model, built, batch, ("attention_mask",))
    assert (with_mask[0] - bare[0]).abs().max() > 1e-4
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    check_family(model, built, {**batch, "labels": labels}, ("attention_mask",),
                 out=lambda o: o.loss[None])
