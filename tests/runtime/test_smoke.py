"""The one line every user writes works on a tiny Llama."""

import torch

import fxpeft
from conftest import token_batch


def test_rewrite_llama_is_identity_at_init(llama):
    gm = fxpeft.rewrite(llama, "lora_qv.toml")
    ids = token_batch()
    gm.graph.lint()
    torch.testing.assert_close(gm(ids).logits, llama(ids).logits, rtol=0, atol=0)
