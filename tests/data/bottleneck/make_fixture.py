"""Writes the AdapterHub parity fixture for fxpeft's bottleneck adapters (``fixture.safetensors``
and ``fixture.json`` beside this file), which ``tests/kinds/test_bottleneck.py`` reads.

AdapterHub's ``adapters`` 1.3 needs transformers 4.57, not fxpeft's environment, so run this in a
separate virtual environment outside the repository::

    python -m venv /tmp/venv-adapters
    /tmp/venv-adapters/bin/pip install torch==2.13.0      # first: a CPU wheel if your index has one
    /tmp/venv-adapters/bin/pip install adapters==1.3.0 "transformers==4.57.*" safetensors
    /tmp/venv-adapters/bin/python tests/data/bottleneck/make_fixture.py

For a tiny BERT (masked LM), a tiny Llama and a tiny GPT-2 (causal LMs), built from the configs in
``MODELS``, it stores the base weights (before ``adapters.init``, so the keys are plain
transformers keys), and for each variant in ``VARIANTS``: AdapterHub's adapter config, the
adapter weights (seeded random values, so no weight is trivially zero), and the logits that
AdapterHub's model computes on the stored inputs. Everything is fp32; the whole fixture stays
well under 1 MB.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
MODELS = {
    "bert": {"class": "BertForMaskedLM", "config": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        vocab_size=64, max_position_embeddings=32, type_vocab_size=2)},
    "llama": {"class": "LlamaForCausalLM", "config": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=64,
        tie_word_embeddings=False)},
    "gpt2": {"class": "GPT2LMHeadModel", "config": dict(
        n_embd=32, n_inner=64, n_layer=2, n_head=4, vocab_size=64, n_positions=16)},
}
# name -> (AdapterHub config class, its arguments), for each model.
VARIANTS = {
    "seq_bn": ("SeqBnConfig", dict(reduction_factor=4)),
    "double_seq_bn": ("DoubleSeqBnConfig", dict(reduction_factor=4)),
    "par_bn": ("ParBnConfig", dict(reduction_factor=4)),
    "seq_bn_options": ("SeqBnConfig", dict(reduction_factor=8, non_linearity="gelu", scaling=0.5,
                                           residual_before_ln=False, original_ln_after=True)),
    "double_seq_bn_options": ("DoubleSeqBnConfig", dict(reduction_factor=2, non_linearity="tanh",
                                                        original_ln_after=False)),
}
MAIN = ("seq_bn", "double_seq_bn", "par_bn")  # all that GPT-2 (Conv1D layers) gets
BERT_ONLY = {"seq_bn_post_add": ("SeqBnConfig", dict(reduction_factor=4, residual_before_ln="post_add",
                                                      non_linearity="sigmoid"))}


def config_class_name(model_class: str) -> str:
    """``BertForMaskedLM`` -> ``BertConfig``, ``GPT2LMHeadModel`` -> ``GPT2Config``."""
    for suffix in ("ForMaskedLM", "ForCausalLM", "LMHeadModel"):
        model_class = model_class.replace(suffix, "Config")
    return model_class


def variants_of(name: str) -> dict:
    if name == "gpt2":
        return {k: VARIANTS[k] for k in MAIN}
    return {**VARIANTS, **(BERT_ONLY if name == "bert" else {})}


def build(name: str) -> torch.nn.Module:
    import transformers
    spec = MODELS[name]
    config_class = getattr(transformers, config_class_name(spec["class"]))
    torch.manual_seed(0)
    return getattr(transformers, spec["class"])(config_class(**spec["config"])).eval()


def randomise(model: torch.nn.Module, adapter: str, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random values for every parameter of ``adapter``; returns them by name."""
    generator = torch.Generator().manual_seed(seed)
    found = {}
    with torch.no_grad():
        for key, param in model.named_parameters():
            if f".adapters.{adapter}." in key:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
                found[key] = param.detach().clone()
    return found


def main() -> None:
    import adapters
    tensors, meta = {}, {"adapters": adapters.__version__, "models": MODELS, "variants": {}}
    import transformers
    meta["transformers"] = transformers.__version__
    for name in MODELS:
        base = build(name)
        for key, value in base.state_dict().items():
            tensors[f"{name}/base/{key}"] = value.clone().contiguous()  # tied tensors: copies
        ids = torch.randint(0, MODELS[name]["config"]["vocab_size"], (2, 7),
                            generator=torch.Generator().manual_seed(1))
        tensors[f"{name}/input_ids"] = ids
        tensors[f"{name}/base_logits"] = base(input_ids=ids).logits.detach()
        variants = variants_of(name)
        for seed, (variant, (config_class, kwargs)) in enumerate(variants.items()):
            model = build(name)
            adapters.init(model)
            config = getattr(adapters, config_class)(**kwargs)
            model.add_adapter(variant, config=config)
            model.set_active_adapters(variant)
            model.eval()
            weights = randomise(model, variant, seed + 10)
            for key, value in weights.items():
                tensors[f"{name}/{variant}/{key}"] = value.contiguous()
            with torch.no_grad():
                tensors[f"{name}/{variant}/logits"] = model(input_ids=ids).logits.contiguous()
            meta["variants"][f"{name}/{variant}"] = config.to_dict()
    save_file(tensors, HERE / "fixture.safetensors")
    (HERE / "fixture.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    print(f"{len(tensors)} tensors, {(HERE / 'fixture.safetensors').stat().st_size} bytes")


if __name__ == "__main__":
    main()
