"""PEFT's custom-model test models (its tests/test_custom_models.py: MLP, Conv1d, Conv2d and their
grouped / 1x1 / bigger variants), rebuilt for the LyCORIS kinds' slices of PEFT's cases (LoHa,
LoKr): the same layers, names and shapes; tests only."""

from __future__ import annotations

import torch


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1 = torch.nn.Linear(10, 20), torch.nn.Linear(20, 2)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x):
        return torch.log_softmax(self.lin1(self.drop(torch.relu(self.lin0(x)))), dim=-1)


class ConvNet(torch.nn.Module):
    """One convolution named ``conv1d`` / ``conv2d`` on the input reshaped to ``view`` (repeated
    ``copies`` times along the channels), then ReLU, flatten and a linear ``lin0``. A ``lead``
    linear first reads the flat input, as PEFT's grouped-Conv2d model has one."""

    def __init__(self, conv, view, features, copies=1, lead=None) -> None:
        super().__init__()
        self.name = "conv2d" if isinstance(conv, torch.nn.Conv2d) else "conv1d"
        self.view, self.copies = view, copies
        self.lead = lead
        setattr(self, self.name, conv)
        self.lin0 = torch.nn.Linear(features, 2)

    def forward(self, x):
        x = self.lead(x.flatten()) if self.lead is not None else x
        x = x.reshape(self.view)
        x = torch.cat([x] * self.copies, dim=1) if self.copies > 1 else x
        x = torch.relu(getattr(self, self.name)(x)).flatten(1)
        return torch.log_softmax(self.lin0(x), dim=-1)


MODELS = {
    "MLP": MLP,
    "Conv2d": lambda: ConvNet(torch.nn.Conv2d(5, 10, 3), (-1, 5, 3, 3), 10),
    "Conv1d": lambda: ConvNet(torch.nn.Conv1d(1, 1, 2), (-1, 1, 10), 9),
    "Conv1dBigger": lambda: ConvNet(torch.nn.Conv1d(64, 16, 2), (-1, 1, 10), 144, copies=64),
    "Conv1dGroups": lambda: ConvNet(torch.nn.Conv1d(8, 8, 3, groups=2), (-1, 1, 10), 64, copies=8),
    "Conv2d1x1": lambda: ConvNet(torch.nn.Conv2d(1, 10, 1), (-1, 1, 3, 3), 90),
    "Conv2dGroups": lambda: ConvNet(torch.nn.Conv2d(16, 16, 3, groups=8), (2, 16, 3, 3), 16,
                                    lead=torch.nn.Linear(90, 288)),
    "Conv2dGroups2": lambda: ConvNet(torch.nn.Conv2d(16, 32, 3, padding=1, groups=2), (-1, 16, 3, 3), 288),
}


def custom_model(model_id):
    torch.manual_seed(0)
    return MODELS[model_id]().eval()


def custom_input(model_id):
    shape = (2, 144) if model_id == "Conv2dGroups2" else (9, 10)  # 144 = 16 channels x 3 x 3
    return torch.arange(shape[0] * shape[1], dtype=torch.float32).view(shape) / 50


# --- the rest of PEFT's custom models (its test_custom_models.py), for the whole LoRA / IA3 /
# AdaLoRA matrix (bench/peft_custom_matrix.py and tests/kinds/test_custom_matrix.py) ----------

class EmbConv1D(torch.nn.Module):
    """PEFT's ``EmbConv1D``: an embedding ``emb`` (100 x 5), transformers' ``Conv1D`` ``conv1d``
    (5 -> 1), flatten and ``lin0``; its input is token ids ``(batch, 10)``."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D
        self.emb, self.conv1d = torch.nn.Embedding(100, 5), Conv1D(1, 5)
        self.lin0 = torch.nn.Linear(10, 2)

    def forward(self, x):
        x = torch.relu(self.conv1d(self.emb(x))).flatten(1)
        return torch.log_softmax(self.lin0(x), dim=-1)


class Conv3dNet(torch.nn.Module):
    """PEFT's ``Conv3d``: the input stacked three times into a volume, ``conv3d`` (5 -> 10,
    kernel 3), flatten and ``lin0``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv3d, self.lin0 = torch.nn.Conv3d(5, 10, 3), torch.nn.Linear(10, 2)

    def forward(self, x):
        x = torch.stack([x] * 3, dim=-1).reshape(-1, 5, 3, 3, 3)
        return torch.log_softmax(self.lin0(torch.relu(self.conv3d(x)).flatten(1)), dim=-1)


class MHANet(torch.nn.Module):
    """PEFT's ``MHA``: ``nn.MultiheadAttention(10, 2)`` ``mha`` on an unbatched sequence, then ``lin0``."""

    def __init__(self) -> None:
        super().__init__()
        self.mha, self.lin0 = torch.nn.MultiheadAttention(10, 2), torch.nn.Linear(10, 2)

    def forward(self, x):
        return torch.log_softmax(self.lin0(self.mha(x, x, x)[0]), dim=-1)


class LinearUsingParameter(torch.nn.Module):
    """A linear written as ``x @ weight + bias`` with a bare ``[in, out]`` parameter."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(in_features, out_features))
        self.bias = torch.nn.Parameter(torch.ones(out_features))

    def forward(self, x):
        return x @ self.weight + self.bias


class MlpUsingParameters(torch.nn.Module):
    """PEFT's ``MlpUsingParameters``: the MLP with ``LinearUsingParameter`` layers."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1 = LinearUsingParameter(10, 20), LinearUsingParameter(20, 2)

    def forward(self, x):
        return torch.log_softmax(self.lin1(torch.relu(self.lin0(x))), dim=-1)


MODELS.update({"EmbConv1D": EmbConv1D, "Conv3d": Conv3dNet, "MHA": MHANet,
               "MlpUsingParameters": MlpUsingParameters})


def matrix_input(model_id: str) -> torch.Tensor:
    """The input of a custom model in the matrix: token ids for ``EmbConv1D``, else ``custom_input``."""
    if model_id == "EmbConv1D":
        return torch.arange(90).view(9, 10) % 100
    return custom_input(model_id)


def peft_custom_cases() -> list[tuple[str, str, type, dict]]:
    """Every LoRA (DoRA, rsLoRA and the LoRA variants included), IA3 and AdaLoRA row of PEFT
    0.21.2's ``tests/test_custom_models.py`` ``TEST_CASES``, in its order: ``(name, model_id,
    config class, config kwargs)``. (PEFT's Conv2dGroups model names its first linear ``lin0``
    and its head ``lin1``; ours, ``lead`` and ``lin0``: its rows target only ``conv2d``.)"""
    from peft import AdaLoraConfig, IA3Config, LoraConfig
    from peft.tuners.lora.config import (BdLoraConfig, KasaConfig, MontecloraConfig,
                                         VeloraConfig)
    lora, ia3, ada = LoraConfig, IA3Config, AdaLoraConfig
    rows = [
        ("Vanilla MLP 1 LoRA", "MLP", lora, {"target_modules": "lin0"}),
        ("Vanilla MLP 2 LoRA", "MLP", lora, {"target_modules": ["lin0"]}),
        ("Vanilla MLP 3 LoRA", "MLP", lora, {"target_modules": ["lin1"]}),
        ("Vanilla MLP 4 LoRA", "MLP", lora, {"target_modules": ["lin0", "lin1"]}),
        ("Vanilla MLP 5 LoRA", "MLP", lora, {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
        ("Vanilla MLP 6 LoRA", "MLP", lora, {"target_modules": ["lin0"], "lora_alpha": 4, "lora_dropout": 0.1}),
        ("Vanilla MLP 7 LoRA with DoRA", "MLP", lora, {"target_modules": ["lin0"], "use_dora": True}),
        ("Vanilla MLP 8 LoRA with DoRA", "MLP", lora, {"target_modules": ["lin0", "lin1"], "use_dora": True}),
        ("Vanilla MLP 1 LoRA with KaSA", "MLP", lora, {"target_modules": ["lin0"], "kasa_config": KasaConfig(), "r": 4}),
        ("Vanilla MLP 1 LoRA with MiCA", "MLP", lora, {"target_modules": ["lin0"], "init_lora_weights": "mica", "r": 4}),
        ("Vanilla MLP 9 LoRA with DoRA", "MLP", lora, {"target_modules": "lin1", "use_dora": True, "lora_alpha": 32}),
        ("Vanilla MLP 10 LoRA with VeLoRA random", "MLP", lora,
         {"target_modules": ["lin0"], "velora_config": VeloraConfig(num_groups=2, init_type="random")}),
        ("Vanilla MLP 11 LoRA with VeLoRA batch_average", "MLP", lora,
         {"target_modules": ["lin0", "lin1"], "velora_config": VeloraConfig(num_groups=2, init_type="batch_average")}),
        ("Vanilla MLP 12 LoRA with VeLoRA batch_average_once", "MLP", lora,
         {"target_modules": ["lin0"], "velora_config": VeloraConfig(num_groups=2, init_type="batch_average_once")}),
        ("Embedding + transformers Conv1D 1 LoRA", "EmbConv1D", lora, {"target_modules": ["conv1d"]}),
        ("Embedding + transformers Conv1D 2 LoRA", "EmbConv1D", lora, {"target_modules": ["emb"]}),
        ("Embedding + transformers Conv1D 3 LoRA", "EmbConv1D", lora, {"target_modules": ["emb", "conv1d"]}),
        ("Embedding + transformers Conv1D 1 DoRA", "EmbConv1D", lora, {"target_modules": ["conv1d"], "use_dora": True}),
        ("Embedding + transformers Conv1D 2 DoRA", "EmbConv1D", lora, {"target_modules": ["emb"], "use_dora": True}),
        ("Embedding + transformers Conv1D 3 DoRA", "EmbConv1D", lora, {"target_modules": ["emb", "conv1d"], "use_dora": True}),
        ("Embedding + transformers Conv1D 1 LoRA trainable_tokens", "EmbConv1D", lora,
         {"target_modules": ["conv1d"], "trainable_token_indices": {"emb": [0, 10]}}),
        ("Conv1d LoRA", "Conv1d", lora, {"target_modules": ["conv1d"]}),
        ("Conv1d LoRA with DoRA", "Conv1d", lora, {"target_modules": ["conv1d"], "use_dora": True}),
        ("Conv2d 1 LoRA", "Conv2d", lora, {"target_modules": ["conv2d"]}),
        ("Conv2d 2 LoRA", "Conv2d", lora, {"target_modules": ["conv2d", "lin0"]}),
        ("Conv2d 1 LoRA with DoRA", "Conv2d", lora, {"target_modules": ["conv2d"], "use_dora": True}),
        ("Conv2d 2 LoRA with DoRA", "Conv2d", lora, {"target_modules": ["conv2d", "lin0"], "use_dora": True}),
        ("Conv2d Groups LoRA", "Conv2dGroups", lora, {"target_modules": ["conv2d"]}),
        ("Conv2d Groups2 LoRA", "Conv2dGroups2", lora, {"target_modules": ["conv2d"]}),
        ("Conv2d Groups LoRA with DoRA", "Conv2dGroups", lora, {"target_modules": ["conv2d"], "use_dora": True}),
        ("Conv2d Groups2 LoRA with DoRA", "Conv2dGroups2", lora, {"target_modules": ["conv2d"], "use_dora": True}),
        ("Conv3d 1 LoRA", "Conv3d", lora, {"target_modules": ["conv3d"]}),
        ("Conv3d 2 LoRA", "Conv3d", lora, {"target_modules": ["conv3d", "lin0"]}),
        ("Conv3d 1 LoRA with DoRA", "Conv3d", lora, {"target_modules": ["conv3d"], "use_dora": True}),
        ("Conv3d 2 LoRA with DoRA", "Conv3d", lora, {"target_modules": ["conv3d", "lin0"], "use_dora": True}),
        ("Vanilla MLP 1 LoRA with lora_b bias", "MLP", lora,
         {"target_modules": ["lin0", "lin1"], "lora_bias": True, "lora_alpha": 32}),
        ("Conv2d 1 LoRA with lora_b bias", "Conv2d", lora, {"target_modules": ["conv2d"], "lora_bias": True, "lora_alpha": 32}),
        ("Conv3d 1 LoRA with lora_b bias", "Conv3d", lora, {"target_modules": ["conv3d"], "lora_bias": True, "lora_alpha": 32}),
        ("MHA 1 LoRA", "MHA", lora, {"target_modules": ["mha"]}),
        ("MHA 2 LoRA", "MHA", lora, {"target_modules": ["mha", "lin0"]}),
        ("MLP 1 using nn.Parameter LoRA", "MlpUsingParameters", lora, {"target_parameters": ["lin0.weight"]}),
        ("MLP 2 using nn.Parameter LoRA", "MLP", lora, {"target_modules": ["lin0"], "target_parameters": ["lin1.weight"]}),
        ("Vanilla MLP 1 LoRA with Monteclora", "MLP", lora,
         {"target_modules": ["lin0"], "monteclora_config": MontecloraConfig(num_samples=2)}),
        ("Vanilla MLP 1 IA3", "MLP", ia3, {"target_modules": "lin0", "feedforward_modules": []}),
        ("Vanilla MLP 2 IA3", "MLP", ia3, {"target_modules": "lin0", "feedforward_modules": "lin0"}),
        ("Vanilla MLP 3 IA3", "MLP", ia3, {"target_modules": ["lin0"], "feedforward_modules": []}),
        ("Vanilla MLP 4 IA3", "MLP", ia3, {"target_modules": ["lin0"], "feedforward_modules": ["lin0"]}),
        ("Vanilla MLP 5 IA3", "MLP", ia3, {"target_modules": ["lin1"], "feedforward_modules": []}),
        ("Vanilla MLP 6 IA3", "MLP", ia3, {"target_modules": ["lin1"], "feedforward_modules": ["lin1"]}),
        ("Vanilla MLP 7 IA3", "MLP", ia3, {"target_modules": ["lin0", "lin1"], "feedforward_modules": []}),
        ("Vanilla MLP 8 IA3", "MLP", ia3, {"target_modules": ["lin0", "lin1"], "feedforward_modules": ["lin0", "lin1"]}),
        ("Vanilla MLP 9 IA3", "MLP", ia3, {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "feedforward_modules": ["lin0"]}),
        ("transformers Conv1D 1 IA3", "EmbConv1D", ia3, {"target_modules": ["conv1d"], "feedforward_modules": ["conv1d"]}),
        ("transformers Conv1D 2 IA3", "EmbConv1D", ia3,
         {"target_modules": ["conv1d", "lin0"], "feedforward_modules": ["conv1d", "lin0"]}),
        ("transformers Conv1D 1 IA3", "EmbConv1D", ia3,
         {"target_modules": ["conv1d"], "feedforward_modules": ["conv1d"], "modules_to_save": ["lin0"]}),
        ("Conv2d 1 IA3", "Conv2d", ia3, {"target_modules": ["conv2d"], "feedforward_modules": []}),
        ("Conv2d 2 IA3", "Conv2d", ia3, {"target_modules": ["conv2d"], "feedforward_modules": ["conv2d"]}),
        ("Conv2d 3 IA3", "Conv2d", ia3, {"target_modules": ["conv2d", "lin0"], "feedforward_modules": []}),
        ("Conv2d 4 IA3", "Conv2d", ia3, {"target_modules": ["conv2d", "lin0"], "feedforward_modules": ["conv2d"]}),
        ("Conv2d 5 IA3", "Conv2d", ia3, {"target_modules": ["conv2d", "lin0"], "feedforward_modules": ["conv2d", "lin0"]}),
        ("Conv3d 1 IA3", "Conv3d", ia3, {"target_modules": ["conv3d"], "feedforward_modules": []}),
        ("Conv3d 2 IA3", "Conv3d", ia3, {"target_modules": ["conv3d"], "feedforward_modules": ["conv3d"]}),
        ("Conv3d 3 IA3", "Conv3d", ia3, {"target_modules": ["conv3d", "lin0"], "feedforward_modules": []}),
        ("Conv3d 4 IA3", "Conv3d", ia3, {"target_modules": ["conv3d", "lin0"], "feedforward_modules": ["conv3d"]}),
        ("Conv3d 5 IA3", "Conv3d", ia3, {"target_modules": ["conv3d", "lin0"], "feedforward_modules": ["conv3d", "lin0"]}),
        ("BD-LoRA A only", "MLP", lora, {"target_modules": ["lin0", "lin1"],
                                         "use_bdlora": BdLoraConfig(target_modules_bd_a=["lin0"], match_strict=False)}),
        ("BD-LoRA B only", "MLP", lora, {"target_modules": ["lin0", "lin1"], "use_bdlora": BdLoraConfig(
            target_modules_bd_b=["lin1"], nblocks=2, match_strict=False)}),
        ("BD-LoRA both A and B", "MLP", lora, {"target_modules": ["lin0", "lin1"], "use_bdlora": BdLoraConfig(
            target_modules_bd_a=["lin0"], target_modules_bd_b=["lin1"], nblocks=2)}),
        ("Vanilla MLP 1 AdaLoRA", "MLP", ada,
         {"target_modules": ["lin0"], "init_lora_weights": False, "total_step": 1, "orth_reg_weight": 0}),
        ("Vanilla MLP 2 AdaLoRA", "MLP", ada, {"target_modules": ["lin0", "lin1"], "init_lora_weights": False, "total_step": 1}),
        ("Conv2d 1 AdaLoRA", "Conv2d", ada, {"target_modules": ["conv2d"], "init_lora_weights": False, "total_step": 1}),
        ("Conv2d 2 AdaLoRA", "Conv2d", ada,
         {"target_modules": ["conv2d", "lin0"], "init_lora_weights": False, "total_step": 1}),
    ]
    from peft import TrainableTokensConfig
    rows.append(("Embedding + transformers Conv1D 1 trainable_tokens", "EmbConv1D", TrainableTokensConfig,
                 {"target_modules": ["emb"], "token_indices": [0, 1, 3], "init_weights": False}))
    return rows
