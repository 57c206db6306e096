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
