"""PEFT 0.21.2's decoder-model matrix (the ``ALL_CONFIGS`` of its tests/test_decoder_models.py,
for the methods fxpeft has, plus its layer-replication and DoRA-on-``embed_tokens`` cases),
rebuilt on tiny models from configs (no hub): one ``run_case`` per (model, config) that checks
logits both ways through the folders, merge and greedy ``generate`` against PEFT. Used by
``bench/peft_decoder_matrix.py`` (the whole matrix) and tests/integration's slice; tests only."""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import fxpeft
from conftest import VOCAB, tiny_gpt2, tiny_llama, tiny_mistral, tiny_opt, tiny_qwen2


def tiny_gptj():
    from transformers import GPTJConfig, GPTJForCausalLM
    torch.manual_seed(0)
    return GPTJForCausalLM(GPTJConfig(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, vocab_size=VOCAB,
                                      n_positions=256, bos_token_id=0, eos_token_id=0)).eval()


def tiny_gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    torch.manual_seed(0)
    return Gemma3ForCausalLM(Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                              vocab_size=VOCAB, sliding_window=16)).eval()


MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "OPT": tiny_opt, "GPT2": tiny_gpt2, "GPTJ": tiny_gptj, "Llama": tiny_llama,
    "Qwen2": tiny_qwen2, "Gemma3": tiny_gemma3, "Mistral": tiny_mistral}

_LORA = {"r": 8, "lora_alpha": 32, "target_modules": None, "lora_dropout": 0.05, "bias": "none"}

# (method, config class name, kwargs): ALL_CONFIGS rows of the methods fxpeft has, as PEFT
# writes them (task_type added by ``peft_config``).
CONFIGS: list[tuple[str, str, dict[str, Any]]] = [
    ("adalora", "AdaLoraConfig", {"target_modules": None, "total_step": 1}),
    ("boft", "BOFTConfig", {"target_modules": None}),
    ("ia3", "IA3Config", {"target_modules": None, "feedforward_modules": None}),
    ("lora", "LoraConfig", _LORA),
    ("lora", "LoraConfig", {**_LORA, "alora_invocation_tokens": [1]}),
    ("lora", "LoraConfig", {**_LORA, "alora_invocation_tokens": [1000]}),
    ("lora", "LoraConfig", {**_LORA, "trainable_token_indices": [0, 1, 3]}),
    ("oft", "OFTConfig", {"target_modules": None}),
    ("prefix_tuning", "PrefixTuningConfig", {"num_virtual_tokens": 10}),
    ("prefix_tuning", "PrefixTuningConfig", {"num_virtual_tokens": 10, "init_weights": "zero"}),
    ("p_tuning", "PromptEncoderConfig", {"num_virtual_tokens": 10, "encoder_hidden_size": 32}),
    ("prompt_tuning", "PromptTuningConfig", {"num_virtual_tokens": 10}),
    ("vera", "VeraConfig", {"r": 8, "target_modules": None, "vera_dropout": 0.05,
                            "projection_prng_key": 0xFF, "d_initial": 0.1, "save_projection": True,
                            "bias": "none"}),
]

# PEFT's single-model cases: test_lora_layer_replication and DoRA on embed_tokens
# (test_lora_embed_scale_is_applied).
EXTRA: list[tuple[str, str, str, dict[str, Any]]] = [
    ("Llama", "lora", "LoraConfig", {"target_modules": ["down_proj", "up_proj"], "lora_dropout": 0.0,
                                     "layer_replication": [[0, 1], [0, 2], [1, 2]]}),
    ("Gemma3", "lora", "LoraConfig", {"target_modules": ["embed_tokens"], "use_dora": True}),
    # PEFT's TrainableTokens alone (its custom-model row's config), on a scaled, tied embedding too
    ("Llama", "trainable_tokens", "TrainableTokensConfig", {"token_indices": [0, 1, 3]}),
    ("Gemma3", "trainable_tokens", "TrainableTokensConfig", {"token_indices": [0, 1, 3]}),
]

GENERATE_TOKENS = 6


@dataclass
class Case:
    """One (model, config) of the matrix and what happened to it."""

    model: str
    method: str
    config: str
    kwargs: dict[str, Any]
    refused: str | None = None
    peft_fails: str | None = None  # PEFT itself cannot build the case (no such row in its suite)
    errors: dict[str, float] = field(default_factory=dict)
    generate: bool | None = None
    generate_note: str = ""

    @property
    def label(self) -> str:
        extra = {k: v for k, v in self.kwargs.items() if k not in _LORA or _LORA[k] != v}
        extra.pop("target_modules", None)
        return f"{self.model}/{self.config}{extra if extra else ''}"


def all_cases() -> list[Case]:
    """Every case: each config on each model, then the single-model cases."""
    cases = [Case(model, method, config, kwargs) for method, config, kwargs in CONFIGS for model in MODELS]
    return cases + [Case(model, method, config, kwargs) for model, method, config, kwargs in EXTRA]


def peft_config(case: Case) -> Any:
    import peft
    return getattr(peft, case.config)(task_type="CAUSAL_LM", **copy.deepcopy(case.kwargs))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows, the first left-padded by three tokens (pad id 1, OPT's), the second with the
    aLoRA invocation token 1 inside it."""
    ids = torch.tensor([[1, 1, 1, 5, 6, 7, 8, 9], [9, 10, 1, 12, 13, 14, 15, 16]])
    mask = (torch.arange(8) >= torch.tensor([[3], [0]])).long()
    return ids, mask


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Every trainable (adapter) tensor moved off its identity init, seeded."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)


def _logits(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float()


def _greedy_by_forward(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Greedy decoding by full forwards, with the ``position_ids`` transformers' ``generate``
    gives (real tokens counted, padding 1): PEFT's prefix tuning adds its length to them, its
    prompt kinds drop them."""
    for _ in range(GENERATE_TOKENS):
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        with torch.no_grad():
            token = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].argmax(-1)
        ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids


def _peft_generate(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=GENERATE_TOKENS,
                              do_sample=False, eos_token_id=None, pad_token_id=0, min_new_tokens=GENERATE_TOKENS)


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"


def run_case(case: Case) -> Case:
    """PEFT's adapter (randomised) -> folder -> fxpeft: logits; fxpeft -> folder -> PEFT:
    logits; merge against PEFT's ``merge_and_unload``; greedy generate against PEFT's. A case
    fxpeft refuses records the refusal's first line; anything else raises."""
    from peft import PeftModel, get_peft_model
    build = MODELS[case.model]
    ids, mask = _batch()
    try:
        peft_model = get_peft_model(build(), peft_config(case)).eval()
    except (ValueError, TypeError) as error:  # no default targets, or a layer type it lacks
        case.peft_fails = _first_line(error)
        return case
    _randomize(peft_model)
    theirs = _logits(peft_model, ids, mask)
    with tempfile.TemporaryDirectory() as there, tempfile.TemporaryDirectory() as back:
        peft_model.save_pretrained(there)
        try:
            gm = fxpeft.load(build(), there).eval()
        except (fxpeft.FxpeftError, ValueError, NotImplementedError) as error:
            case.refused = _first_line(error)
            return case
        case.errors["peft->fxpeft"] = (_logits(gm, ids, mask) - theirs).abs().max().item()
        fxpeft.save(gm, back)
        reloaded = PeftModel.from_pretrained(build(), back).eval()
        case.errors["fxpeft->peft"] = (_logits(reloaded, ids, mask) - theirs).abs().max().item()
        _merge(case, gm, peft_model, ids, mask)
        _generate(case, gm, peft_model, ids, mask)
    return case


def _merge(case: Case, gm: Any, peft_model: Any, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """Merged logits against PEFT's merged model, where both merge."""
    try:
        merged = fxpeft.merge(gm)
    except (fxpeft.FxpeftError, ValueError, NotImplementedError):
        return  # no merge for this kind (prompt learning), as PEFT
    reference = copy.deepcopy(peft_model).merge_and_unload()
    case.errors["merge"] = (_logits(merged, ids, mask) - _logits(reference, ids, mask)).abs().max().item()


def _generate(case: Case, gm: Any, peft_model: Any, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """fxpeft's greedy tokens against PEFT's ``generate``; where they differ, against PEFT's
    forward step by step too (transformers 5.25 breaks PEFT's cached generate for prompt kinds)."""
    ours = fxpeft.generate(gm, ids, max_new_tokens=GENERATE_TOKENS, attention_mask=mask, eos_token_id=[])
    try:
        theirs = _peft_generate(peft_model, ids, mask)
    except Exception as error:  # noqa: BLE001  PEFT's own generate failing is a finding
        theirs, case.generate_note = None, f"PEFT generate fails ({_first_line(error)})"
    case.generate = theirs is not None and ours.tolist() == theirs.tolist()
    if not case.generate and ours.tolist() == _greedy_by_forward(peft_model, ids, mask).tolist():
        case.generate_note = (case.generate_note or "PEFT generate differs") + "; equals PEFT's forward step by step"
        case.generate = None
