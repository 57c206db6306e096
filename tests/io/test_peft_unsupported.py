"""A PEFT folder that needs something fxpeft cannot do fails with an error naming that feature
(the layer type, the peft_type, the config field), never a bare "unexpected key"."""

import copy
import re

import pytest
import torch
from peft import BOFTConfig, FourierFTConfig, LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.config import MontecloraConfig

import fxpeft
from conftest import tiny_llama
from fxpeft.formats.peft_format import PeftFormatError
from peft_models import custom_model


class Volume(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.vol = torch.nn.Conv3d(2, 4, 3)  # PEFT adapts Conv3d, and so does fxpeft
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.vol(x).mean((2, 3, 4)))


def saved(tmp_path, base, config):
    torch.manual_seed(0)
    get_peft_model(copy.deepcopy(base), config).save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("targets", [["vol", "proj"], ["vol"]])
def test_lora_on_a_conv3d_loads(tmp_path, targets):
    torch.manual_seed(0)
    base, x = Volume(), torch.randn(2, 2, 5, 5, 5)
    folder = saved(tmp_path, base, LoraConfig(target_modules=targets, init_lora_weights=False))
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    with torch.no_grad():
        torch.testing.assert_close(fxpeft.load(base, folder)(x), peft_model(x), rtol=0, atol=1e-6)


def test_boft_on_a_conv2d_names_the_layer_and_leaves_the_graph(tmp_path):
    """PEFT's BOFT adapts a Conv2d; fxpeft's, linears only."""
    folder = saved(tmp_path, custom_model("Conv2d"),
                   BOFTConfig(target_modules=["conv2d", "lin0"], boft_block_size=5))
    graph = fxpeft.rewrite(custom_model("Conv2d"), LoraConfig(target_modules=["lin0"]))
    with pytest.raises(PeftFormatError, match=r"needs BOFT \(boft\) on Conv2d at conv2d.*"
                                              r"its boft adapters apply to linear layers"):
        fxpeft.load(graph, folder, adapter="other")
    assert graph.adapter_names == ["default"]  # the graph is left as it was


@pytest.mark.parametrize("config, feature", [
    (FourierFTConfig(target_modules=["q_proj"]), r"adapter_config.json: peft_type 'FOURIERFT' is not supported"),
    (LoraConfig(target_modules=["q_proj"], monteclora_config=MontecloraConfig()),
     r"adapter_config.json: monteclora_config is set: the LoRA variant is not supported: MonteCLoRA"),
])
def test_unsupported_types_and_fields_are_named(tmp_path, config, feature):
    with pytest.raises(PeftFormatError, match=feature):
        fxpeft.load(tiny_llama(), saved(tmp_path, tiny_llama(), config))
