"""Bad tensors caught at the door (issue 24, item 3): ``gm(...)`` and ``generate`` refuse inputs
the captured graph cannot take with a one-line ``InputError`` naming the argument, before any
aten op runs, and the graph is unchanged after it."""

import pytest
import torch

import fxpeft
from fxpeft.errors import FxpeftError, InputError
from fxpeft.runtime import input_checks
from conftest import VOCAB, tiny_gpt2, tiny_llama


@pytest.fixture(scope="module")
def llama():
    return fxpeft.rewrite(tiny_llama(), "lora_qv.toml")


@pytest.fixture(scope="module")
def gpt2():
    return fxpeft.rewrite(tiny_gpt2(), "lora_all_linear.toml")


def _ids(batch=2, seq=5, seed=0):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _tensors(gm):
    return {name: value.clone() for name, value in gm.state_dict().items()}


def _refused(gm, message, *args, **kwargs):
    """The call raises an InputError matching ``message``, on one line, and changes no tensor."""
    before = _tensors(gm)
    with pytest.raises(InputError, match=message) as error:
        gm(*args, **kwargs)
    assert "\n" not in str(error.value)
    after = gm.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)


CASES = {
    "float ids": (dict(input_ids=_ids().float()),
                  r"^input_ids holds token ids, an integer tensor \(torch.long\); got torch.float32"),
    "ids past the vocabulary": (dict(input_ids=_ids().index_fill(1, torch.tensor([2]), VOCAB + 3)),
                                rf"^input_ids holds token id {VOCAB + 3}, outside the vocabulary \[0, {VOCAB}\) of "),
    "negative ids": (dict(input_ids=_ids().index_fill(1, torch.tensor([0]), -1)),
                     r"^input_ids holds token id -1, outside the vocabulary"),
    "3-D ids": (dict(input_ids=_ids()[None]),
                r"^input_ids must be \[batch, tokens\], as \w+ was captured; got shape \(1, 2, 5\) \(3-D\)"),
    "empty sequence": (dict(input_ids=_ids(seq=0)),
                       r"^input_ids is empty \(shape \(2, 0\)\): give at least one token per row"),
    "mask of the wrong shape": (dict(input_ids=_ids(), attention_mask=torch.ones(2, 4, dtype=torch.long)),
                                r"^attention_mask has shape \(2, 4\), input_ids \(2, 5\); they must match"),
}


@pytest.mark.parametrize("model", ["llama", "gpt2"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_input_is_a_one_line_error_naming_the_argument(model, case, request):
    gm = request.getfixturevalue(model)
    kwargs, message = CASES[case]
    _refused(gm, message, **kwargs)


def test_the_ids_are_checked_when_passed_positionally(llama):
    _refused(llama, "^input_ids holds token ids", _ids().float())
    _refused(llama, "^attention_mask has shape", _ids(), torch.ones(2, 4, dtype=torch.long))


def test_a_sequence_longer_than_gpt2s_learned_positions_is_refused(gpt2):
    _refused(gpt2, r"^input_ids has 257 tokens, which exceeds the 256 positions GPT2LMHeadModel "
                   r"embeds \(transformer.wpe\)", input_ids=_ids(1, 257))
    gpt2(input_ids=_ids(1, 256))  # the longest it embeds runs


def test_a_rotary_model_has_no_position_bound(llama):
    assert input_checks.input_spec(llama).positions is None
    assert llama(input_ids=_ids(1, 300)).logits.shape == (1, 300, VOCAB)


def test_generate_refuses_the_same_inputs_and_a_prompt_with_no_room_to_grow(gpt2):
    with pytest.raises(InputError, match="^input_ids is empty"):
        fxpeft.generate(gpt2, _ids(seq=0), max_new_tokens=2)
    with pytest.raises(InputError, match=rf"^input_ids holds token id {VOCAB}, outside the vocabulary"):
        fxpeft.generate(gpt2, torch.full((1, 3), VOCAB), max_new_tokens=2)
    with pytest.raises(InputError, match=r"^the prompt plus max_new_tokens=10 has 260 tokens, which "
                                         r"exceeds the 256 positions GPT2LMHeadModel embeds"):
        fxpeft.generate(gpt2, _ids(1, 250), max_new_tokens=10)


def test_the_vocabulary_check_reads_values_only_on_the_cpu_unless_switched(llama):
    on_device = torch.zeros(1, 2, dtype=torch.long, device="meta")  # stands for a GPU: no values read
    assert not input_checks.values_checked(llama, on_device)
    assert input_checks.values_checked(llama, torch.zeros(1, 2, dtype=torch.long))
    llama.check_token_values = False
    try:
        with pytest.raises(IndexError):  # not checked: aten's own error
            llama(input_ids=torch.full((1, 2), VOCAB))
        llama.check_token_values = True
        assert input_checks.values_checked(llama, on_device)
    finally:
        llama.check_token_values = None


def test_the_checks_add_no_graph_break_under_fullgraph_compile(llama):
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(llama, backend=counter, fullgraph=True)
    with torch.no_grad():
        expected = llama(input_ids=_ids()).logits
        torch.testing.assert_close(compiled(input_ids=_ids()).logits, expected, rtol=0, atol=0)
        with pytest.raises(FxpeftError, match="^input_ids holds token ids"):
            compiled(input_ids=_ids().float())
    assert counter.frame_count == 1


def test_a_plain_module_graph_is_not_checked():
    gm = fxpeft.rewrite(torch.nn.Sequential(torch.nn.Linear(2, 2)),
                        fxpeft.rules.Rule(where=fxpeft.rules.Where(path=["0"])))
    assert input_checks.input_spec(gm) is None
    assert gm(torch.ones(1, 2)).shape == (1, 2)
