"""Bottleneck adapters (AdapterHub's seq_bn, double_seq_bn, par_bn): outputs equal AdapterHub's
recorded ones (tests/data/bottleneck, written by make_fixture.py under adapters 1.3), through
fxpeft's own FXPEFT_BOTTLENECK folders; identity at init with "mam_adapter"; the graph; gradients;
named adapters and mixed batches; no merge; compile, bf16, fuse and KV-cached generate."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import fxpeft
from conftest import (VOCAB, assert_only_adapters_get_grads, emitted_base, randomize_adapters,
                      tiny_bert, tiny_gpt2, tiny_llama, token_batch)
from fxpeft.kinds.bottleneck import BottleneckParams
from fxpeft.names import ADAPTER_META
from fxpeft.rules import Rule, Where

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "bottleneck"
META = json.loads((FIXTURE / "fixture.json").read_text())
ATOL = 1e-5
# AdapterHub's module holding the adapters -> the projection fxpeft names the site by.
LOCATIONS = [(r"\.attention\.output\.adapters\.[^.]+\.", ".attention.output.dense."),
             (r"\.output\.adapters\.[^.]+\.", ".output.dense."),
             (r"\.attention_adapters\.adapters\.[^.]+\.", ".self_attn.o_proj."),
             (r"\.output_adapters\.adapters\.[^.]+\.", ".mlp.down_proj.")]
CONFIG_FIELDS = ("reduction_factor", "non_linearity", "is_parallel", "original_ln_before",
                 "original_ln_after", "residual_before_ln", "scaling", "dropout", "init_weights")
SEQ = Rule(match="residual", where=Where(path=[r"(^|\.)(layer\.\d+\.output\.dense|down_proj)$"]),
           params=BottleneckParams(reduction_factor=4))


def _fixture(prefix: str) -> dict[str, torch.Tensor]:
    with safe_open(FIXTURE / "fixture.safetensors", "pt") as f:
        return {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


def _base_model(family: str) -> torch.nn.Module:
    """The fixture's tiny model built by this transformers, with AdapterHub's run's weights."""
    import transformers
    spec = META["models"][family]
    config_class = getattr(transformers, spec["class"].replace("ForMaskedLM", "Config")
                           .replace("ForCausalLM", "Config"))
    model = getattr(transformers, spec["class"])(config_class(**spec["config"])).eval()
    state = _fixture(f"{family}/base/")
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model


def _fxpeft_key(adapterhub_key: str) -> str:
    for pattern, projection in LOCATIONS:
        key, found = re.subn(pattern, projection, adapterhub_key, count=1)
        if found:
            return "base_model.model." + key.replace("adapter_down.0.", "adapter_down.")
    raise AssertionError(f"no location for {adapterhub_key}")


def _folder(family: str, variant: str, tmp_path: Path) -> Path:
    """An FXPEFT_BOTTLENECK folder holding AdapterHub's adapter: its config fields, its weights
    under fxpeft's keys."""
    weights = {k: v for k, v in _fixture(f"{family}/{variant}/").items() if k != "logits"}
    tensors = {_fxpeft_key(k): v for k, v in weights.items()}
    paths = sorted({k.removeprefix("base_model.model.").rsplit(".", 2)[0] for k in tensors})
    hub = META["variants"][f"{family}/{variant}"]
    config = {"peft_type": "FXPEFT_BOTTLENECK", "target_modules": "|".join(map(re.escape, paths)),
              **{field: hub[field] for field in CONFIG_FIELDS}}
    folder = tmp_path / f"{family}_{variant}"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, folder / "adapter_model.safetensors")
    return folder


PARITY = sorted(key.split("/") for key in META["variants"])


@pytest.mark.parametrize("family,variant", PARITY, ids=["/".join(p) for p in PARITY])
def test_outputs_equal_adapterhub(family, variant, tmp_path):
    ids = _fixture(f"{family}/")["input_ids"]
    expected = _fixture(f"{family}/{variant}/")["logits"]
    base = _base_model(family)
    torch.testing.assert_close(base(input_ids=ids).logits, _fixture(f"{family}/")["base_logits"],
                               rtol=0, atol=ATOL)  # the same base model in both environments
    gm = fxpeft.load(base, _folder(family, variant, tmp_path))
    torch.testing.assert_close(gm(ids).logits, expected, rtol=0, atol=ATOL)
    assert (expected - _fixture(f"{family}/")["base_logits"]).abs().max() > 1e-2
