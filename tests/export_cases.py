"""Every registered adapter kind on the tiny Llama, exported for vLLM-style servers once per
test session (``fxpeft.export_lora``), for tests/io/test_export_lora.py and
tests/io/test_vllm_rules.py (tests only)."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import torch

import fxpeft
from conftest import randomize_adapters, tiny_llama

# The bundled rule file that puts each kind on the tiny Llama (modules_to_save: LoRA on q, v
# plus a trained copy of lm_head).
KIND_RULES = {"lora": "lora_qv", "ia3": "ia3", "adaption_prompt": "llama_adapter",
              "modules_to_save": "lora_qv", "dora": "dora_qv", "adalora": "adalora_qv",
              "prompt_tuning": "prompt_tuning", "vera": "vera", "loha": "loha",
              "bottleneck": "bottleneck_seq", "oft": "oft", "boft": "boft", "p_tuning": "p_tuning",
              "lokr": "lokr", "prefix_tuning": "prefix_tuning",
              "trainable_tokens": {"peft_type": "TRAINABLE_TOKENS", "token_indices": [0, 1, 3]},
              "alora": {"peft_type": "LORA", "target_modules": ["q_proj", "v_proj"],
                        "alora_invocation_tokens": [5, 6]}}

# Written out, not read from the registry: which kinds export (exactly, at max_rank 64, which
# holds every weight of the tiny Llama at full rank) and which are refused, with the words of
# the refusal. A new kind must be placed here.
EXPORTS = ("lora", "ia3", "dora", "adalora", "vera", "loha", "oft", "boft", "lokr")
REFUSED = {"adaption_prompt": "adaption prompts are no linear change of a weight",
           "modules_to_save": "vLLM-style servers refuse (modules_to_save must be None)",
           "prompt_tuning": "prompt tuning adds input positions",
           "bottleneck": "a bottleneck adapter puts a non-linearity",
           "p_tuning": "p-tuning adds input positions",
           "prefix_tuning": "prefix tuning adds attended keys and values",
           "trainable_tokens": "trainable tokens replace whole rows of the embedding table",
           "alora": "aLoRA applies only from the invocation tokens on"}
MAX_RANK = 64
_ROOT = Path(tempfile.mkdtemp(prefix="fxpeft-export-tests-"))
atexit.register(shutil.rmtree, _ROOT, True)


@functools.lru_cache(maxsize=None)
def adapted(kind: str) -> fxpeft.AdaptedModule:
    """The tiny Llama with one ``kind`` adapter, its parameters moved off their init (seeded).
    Shared between tests: never change it."""
    extra = {"modules_to_save": ["lm_head"]} if kind == "modules_to_save" else {}
    gm = fxpeft.rewrite(tiny_llama(), KIND_RULES[kind], **extra).eval()
    randomize_adapters(gm, seed=1)
    return gm


@functools.lru_cache(maxsize=None)
def exported(kind: str, max_rank: int = MAX_RANK):
    """``export_lora``'s answer for ``kind`` at ``max_rank`` (a folder under a session temp dir)."""
    return fxpeft.export_lora(adapted(kind), _ROOT / f"{kind}-{max_rank}", max_rank=max_rank)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits
