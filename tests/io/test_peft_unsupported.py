"""A PEFT folder that needs something fxpeft cannot do fails with an error naming that feature
(the layer type, the peft_type, the config field), never a bare "unexpected key"."""

import copy
import re

import pytest
import torch
from peft import FourierFTConfig, LoraConfig, get_peft_model

import fxpeft
from conftest import tiny_llama
from fxpeft.formats.peft_format import PeftFormatError


class Volume(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.vol = torch.nn.Conv3d(2, 4, 3)  # PEFT adapts Conv3d; fxpeft's conv sites are 1-d/2-d
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.vol(x).mean((2, 3, 4)))


def saved(tmp_path, base, config):
    torch.manual_seed(0)
    get_peft_model(copy.deepcopy(base), config).save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("targets", [["vol", "proj"], ["vol"]])
def test_lora_on_a_conv3d_names_the_layer_type(tmp_path, targets):
    torch.manual_seed(0)
    base = Volume()
    folder = saved(tmp_path, base, LoraConfig(target_modules=targets))
    expected = (f"{folder / 'adapter_model.safetensors'}: base_model.model.vol.lora_A.weight: the "
                f"adapter needs LORA (lora) on Conv3d at vol, which fxpeft does not support")
    with pytest.raises(PeftFormatError, match=re.escape(expected)):
        fxpeft.load(base, folder)


def test_dora_on_an_embedding_names_dora_and_the_layer(tmp_path):
    folder = saved(tmp_path, tiny_llama(), LoraConfig(target_modules=["embed_tokens", "q_proj"], use_dora=True))
    graph = fxpeft.rewrite(tiny_llama(), "lora_qv")
    with pytest.raises(PeftFormatError, match=r"needs LORA \(dora\) on Embedding at model.embed_tokens.*"
                                              r"its dora adapters apply to linear layers"):
        fxpeft.load(graph, folder, adapter="other")
    assert graph.adapter_names == ["default"]  # the graph is left as it was


@pytest.mark.parametrize("config, feature", [
    (FourierFTConfig(target_modules=["q_proj"]), r"adapter_config.json: peft_type 'FOURIERFT' is not supported"),
    (LoraConfig(target_modules=["q_proj"], lora_bias=True), r"adapter_config.json: lora_bias = True is not supported"),
    (LoraConfig(target_modules=["q_proj"], trainable_token_indices=[1, 2]),
     r"adapter_config.json: trainable_token_indices = \[1, 2\] is not supported"),
])
def test_unsupported_types_and_fields_are_named(tmp_path, config, feature):
    with pytest.raises(PeftFormatError, match=feature):
        fxpeft.load(tiny_llama(), saved(tmp_path, tiny_llama(), config))
