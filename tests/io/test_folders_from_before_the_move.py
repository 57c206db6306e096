"""Adapter folders written by fxpeft before the house moved its files into stage folders
(commit 6ca3cdf: ``fxpeft.save`` of a tiny Llama, adapters moved off their init with a fixed
seed, and the logits that graph computed) load today with the same outputs."""

import pytest
import torch
from safetensors.torch import load_file

import fxpeft
from conftest import REPO_ROOT, tiny_llama

FOLDERS = REPO_ROOT / "tests" / "data" / "pre_house"


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_a_folder_saved_before_the_move_loads_with_identical_outputs(kind, tmp_path):
    expected = load_file(str(FOLDERS / kind / "expected.safetensors"))
    gm = fxpeft.load(tiny_llama(), FOLDERS / kind).eval()
    logits = gm(input_ids=expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-6)
    assert not torch.allclose(logits, tiny_llama()(input_ids=expected["input_ids"]).logits)
