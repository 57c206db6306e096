"""What backward keeps: the bytes of the tensors autograd saves during one forward, by producer,
for HF PEFT and for fxpeft's graphs (each storage counted once, parameters left out).

The producer of a saved tensor is the module that was running when autograd saved it (a module
hook for PEFT's eager model; the fx node's ``nn_module_stack`` for a graph), with the layer
number replaced by ``*``, and the tensor's shape. This is what ``bench/memory.py``'s peak is made
of, minus what the process has besides (weights, the optimizer, code).

    python bench/saved_tensors.py [--model smollm2-shape|llama] [--batch 4 --seq 128] [--top 12]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.fx

sys.path.insert(0, str(Path(__file__).parent))
from fxpeft.helpers.memory import SavedTensors  # noqa: E402

_LAYER_NUMBER = re.compile(r"\.\d+(?=\.|$)")


def _short(path: str) -> str:
    return _LAYER_NUMBER.sub(".*", path) or "(top)"


def label_modules(model: torch.nn.Module, saved: SavedTensors) -> list[Any]:
    """Module hooks that set ``saved.label`` to the innermost running module's path."""
    stack: list[str] = []
    handles = []
    for name, module in model.named_modules():
        def enter(_m: Any, _a: Any, name: str = name) -> None:
            stack.append(name)
            saved.label = _short(name)

        def leave(_m: Any, _a: Any, _o: Any) -> None:
            stack.pop()
            saved.label = _short(stack[-1]) if stack else "?"
        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    return handles


class LabelledInterpreter(torch.fx.Interpreter):
    """Runs a graph node by node, labelling each node's saved tensors with its module (or, for
    nodes a pass made, its own name)."""

    def __init__(self, gm: torch.fx.GraphModule, saved: SavedTensors) -> None:
        super().__init__(gm)
        self.saved = saved

    def run_node(self, node: torch.fx.Node) -> Any:
        stack = node.meta.get("nn_module_stack")
        where = _short(next(reversed(stack.values()))[0]) if stack else "?"
        target = getattr(node.target, "__name__", str(node.target))
        self.saved.label = f"{where} {target}"
        return super().run_node(node)

    def placeholder(self, target: Any, args: Any, kwargs: Any) -> Any:
        if str(target).startswith("**"):  # the graph's **kwargs: one dict, not a list of the rest
            return next(self.args_iter)
        return super().placeholder(target, args, kwargs)


def _parameters(model: torch.nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


def measure_eager(model: torch.nn.Module, ids: torch.Tensor) -> SavedTensors:
    """Saved tensors of one training forward of an eager model (labels=ids)."""
    saved = SavedTensors(exclude=_parameters(model))
    handles = label_modules(model, saved)
    try:
        with saved:
            loss = model(input_ids=ids, labels=ids).loss
    finally:
        for handle in handles:
            handle.remove()
    del loss
    return saved


def measure_graph(gm: torch.fx.GraphModule, ids: torch.Tensor) -> SavedTensors:
    """Saved tensors of one training forward of an fxpeft graph (labels=ids), node by node."""
    saved = SavedTensors(exclude=_parameters(gm))
    with saved:
        out = _interpret(gm, saved, ids)
    del out
    return saved


def _interpret(gm: torch.fx.GraphModule, saved: SavedTensors, ids: torch.Tensor) -> Any:
    """The graph's forward, its keyword arguments bound to its placeholders as ``forward``
    binds them, run by the labelling interpreter."""
    import inspect
    bound = inspect.signature(type(gm).forward).bind(gm, input_ids=ids, labels=ids)
    bound.apply_defaults()
    values = list(bound.arguments.values())[1:]
    return LabelledInterpreter(gm, saved).run(*values)


def rows(saved: SavedTensors, top: int) -> Iterator[tuple[str, tuple, float]]:
    """The ``top`` largest (label, shape, MiB) groups, largest first."""
    ordered = sorted(saved.by_label.items(), key=lambda item: -item[1])
    for (label, shape), size in ordered[:top]:
        yield label, shape, size / 2 ** 20


def main() -> None:
    import copy

    import fxpeft
    from memory import _model
    from run import peft_lora
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-shape", choices=["smollm2-shape", "llama"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    model = _model(args.model, "fxpeft")
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(0))
    gm = fxpeft.rewrite(copy.deepcopy(model), "lora_qv", dropout=0.0).train()
    sides = {"PEFT": measure_eager(peft_lora(model).train(), ids),
             "fxpeft": measure_graph(gm, ids), "fxpeft fused": measure_graph(fxpeft.fuse(gm), ids)}
    print(f"{args.model}, batch {args.batch} x {args.seq}, LoRA q,v: bytes autograd saves in one forward")
    for side, saved in sides.items():
        print(f"\n{side}: {saved.total() / 2 ** 20:.1f} MiB "
              f"({saved.total() / sides['PEFT'].total():.3f} x PEFT)")
        for label, shape, mib in rows(saved, args.top):
            print(f"  {mib:8.1f} MiB  {label:<55} {list(shape)}")


if __name__ == "__main__":
    main()
