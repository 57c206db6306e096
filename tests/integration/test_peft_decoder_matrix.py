"""A slice of PEFT 0.21.2's decoder-model matrix (``tests/decoder_matrix.py``; the whole matrix is
``bench/peft_decoder_matrix.py``): rows fxpeft reproduces, logits both ways through the folders,
merge and greedy generate equal to PEFT's, prompt tuning on GPT-2 with a left-padded row among
them, and PEFT's layer-replication row (its merge refused, as PEFT's ``_check_merge_allowed``
means to)."""

import pytest

from decoder_matrix import CONFIGS, EXTRA, Case, run_case

EXACT = 1e-5


def _row(model, config, **match):
    """The matrix's case for ``model`` and the ``CONFIGS`` row of class ``config`` whose kwargs
    hold ``match``."""
    for method, name, kwargs in CONFIGS:
        if name == config and all(kwargs.get(k) == v for k, v in match.items()) and \
                all(k in match for k in ("alora_invocation_tokens", "trainable_token_indices") if k in kwargs):
            return Case(model, method, name, kwargs)
    raise LookupError(config)


@pytest.mark.parametrize("case", [
    _row("GPT2", "PromptTuningConfig"),
    _row("OPT", "IA3Config"),
    _row("Gemma3", "LoraConfig", trainable_token_indices=[0, 1, 3]),
    Case(*EXTRA[0]),  # layer_replication on Llama: merge refused, as PEFT means to
], ids=lambda c: c.label)
def test_rows_reproduce_both_ways_merge_and_generate(case):
    run_case(case)
    assert case.refused is None
    assert max(case.errors.values()) <= EXACT, case.errors
    assert case.generate is True or (case.generate is None and "forward" in case.generate_note), case.generate_note
