"""``fxpeft.Trainer``: the HF ``Trainer`` whose checkpoints hold PEFT-format adapters, and
``AdapterCheckpoints``, the mixin that does it for any ``transformers.Trainer`` subclass.

The stock ``transformers.Trainer`` calls ``save_pretrained`` only on a ``PreTrainedModel`` or a
``PeftModel`` (``isinstance`` checks in ``Trainer._save``); any other model gets the whole
``state_dict`` as ``model.safetensors``, and resuming reads only that file or a ``PeftModel``'s
adapters. So this subclass changes exactly those three places for an ``AdaptedModule``:

- ``_save`` writes every adapter in PEFT's layout (``adapter_config.json``,
  ``adapter_model.safetensors``, ``fxpeft_rules.toml``; ``default`` in the checkpoint folder,
  any other adapter in a subfolder of its name, as ``PeftModel.save_pretrained`` does), and no
  base weights;
- ``_load_from_checkpoint`` (``train(resume_from_checkpoint=...)``) and ``_load_best_model``
  (``load_best_model_at_end``) copy those weights back into the graph's adapters.

Optimizer, scheduler, RNG and trainer state are the stock Trainer's, untouched, except under
FSDP2: a graph sharded per layer (``fxpeft.helpers.sharding.shard_layers``, called on every rank
before the Trainer) keeps its sharding. With accelerators, pass ``fsdp`` arguments naming
version 2 (accelerate leaves an ``FSDPModule`` as it is). On the CPU (gloo) pass no ``fsdp``
arguments: accelerate has no FSDP there and would wrap the graph in DDP, so
``_prepare_for_training`` prepares the sharded graph as the Trainer prepares a model sharded at
load time: autocast only, no DDP (FSDP2's own reduce-scatter averages the gradients), the data
loader still split per rank. Checkpoints then gather the adapter (rank 0 writes the PEFT
folder, no base weights) and the optimizer state, whole, into ``optimizer.pt``; resuming
scatters both back. Routes that cannot work are refused when the Trainer is made, naming the
one that does.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import transformers
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINING_ARGS_NAME

from fxpeft.errors import FxpeftError
from fxpeft.runtime.adapted_module import AdaptedModule
from fxpeft.io.checkpoints import restore_adapters, save_adapters
from fxpeft.io.serialize import has_sharded_adapters
from fxpeft.helpers.sharding import without_ddp

_SHARD_FIRST = ("shard the graph first, on every rank, with "
                "fxpeft.helpers.sharding.shard_layers(gm), and pass TrainingArguments(fsdp="
                "True, fsdp_config={'version': 2}) with accelerators, no `fsdp` arguments on the CPU")
_ON_CPU = ("accelerate turns FSDP on only with accelerators (CUDA, XPU, ...): on the CPU (gloo) "
           "it ignores `fsdp` arguments and would wrap this unsharded graph in DDP. On the CPU, "
           "pass fxpeft.Trainer a graph sharded by fxpeft.helpers.sharding.shard_layers (called on "
           "every rank), or use fxpeft.Trainer with DDP (no `fsdp` arguments)")


def _fsdp_version(trainer: Any) -> int:
    """The FSDP version asked for: accelerate's plugin where it is on, else the arguments'."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if plugin is not None:
        return int(getattr(plugin, "fsdp_version", 2))
    return int(trainer.args.fsdp_config.get("version", 2)) if trainer.args.fsdp else 2


def check_sharding_route(trainer: Any) -> None:
    """Refuse the sharded setups that cannot train an fxpeft graph, naming the one that does:
    DeepSpeed, FSDP1, ``fsdp`` arguments on an unsharded graph (accelerate finds no layer
    modules to wrap with accelerators, and wraps it in DDP on the CPU).

    >>> check_sharding_route(object())  # not an fxpeft graph: nothing to check
    """
    model = getattr(trainer, "model", None)
    if not isinstance(model, AdaptedModule):
        return
    name = type(trainer).__name__
    if getattr(trainer, "is_deepspeed_enabled", False):
        raise FxpeftError(f"{name}: DeepSpeed partitions parameters the fxpeft graph reads directly; "
                          f"use DDP, or FSDP2: {_SHARD_FIRST}")
    asked, on = bool(trainer.args.fsdp), getattr(trainer, "is_fsdp_enabled", False)
    if not (asked or on):
        return
    version = _fsdp_version(trainer)
    if version != 2:
        raise FxpeftError(f"{name}: FSDP version {version} wraps modules the flat fxpeft "
                          f"graph never calls; {_SHARD_FIRST}")
    if has_sharded_adapters(model):
        return
    if not on:
        raise FxpeftError(f"{name}: `fsdp` arguments on {trainer.args.device.type}: {_ON_CPU}")
    raise FxpeftError(f"{name}: `fsdp` arguments on an unsharded fxpeft graph: "
                      "accelerate's wrapping finds no layer modules in it (the graph reads "
                      f"every weight directly); {_SHARD_FIRST}")


class AdapterCheckpoints:
    """Mix into any ``transformers.Trainer`` subclass (``trl.SFTTrainer``, ``trl.DPOTrainer``,
    your own) so an fxpeft graph's checkpoints hold only its adapters, in PEFT's layout, and
    resuming restores them. Any other model is handled as the trainer handles it. This is the
    one implementation: ``fxpeft.Trainer`` is ``transformers.Trainer`` with it.

    >>> import transformers
    >>> class MyTrainer(AdapterCheckpoints, transformers.Trainer): pass
    >>> with_adapter_checkpoints(transformers.Trainer).__name__
    'FxpeftTrainer'
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        check_sharding_route(self)

    def _sharded(self) -> bool:
        return isinstance(self.model, AdaptedModule) and has_sharded_adapters(self.model)

    def _prepare_for_training(self, *args: Any, **kwargs: Any) -> Any:
        if not self._sharded() or self.is_fsdp_enabled:  # accelerate's FSDP2 keeps an FSDPModule
            return super()._prepare_for_training(*args, **kwargs)
        with without_ddp(self.accelerator):  # no FSDP in accelerate here (the CPU)
            return super()._prepare_for_training(*args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not self._sharded():
            return super().save_model(output_dir, _internal_call)
        folder = output_dir if output_dir is not None else self.args.output_dir
        save_adapters(self.model, folder)  # every rank gathers; rank 0 writes
        if self.args.should_save:
            self._save_extras(folder)
        return None

    def _save_extras(self, folder: str) -> None:
        if self.processing_class is not None:
            self.processing_class.save_pretrained(folder)
        torch.save(self.args, os.path.join(folder, TRAINING_ARGS_NAME))  # as the stock Trainer

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self._sharded():
            return super()._save_optimizer_and_scheduler(output_dir)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        whole = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on rank 0
        state = get_optimizer_state_dict(self.model, self.optimizer, options=whole)
        if self.args.should_save:
            torch.save(state, os.path.join(output_dir, OPTIMIZER_NAME))
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))
        return None

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not self._sharded():
            return super()._load_optimizer_and_scheduler(checkpoint)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        state = torch.load(os.path.join(checkpoint, OPTIMIZER_NAME), map_location="cpu", weights_only=True)
        set_optimizer_state_dict(self.model, self.optimizer, state,  # each rank keeps its shard
                                 options=StateDictOptions(full_state_dict=True))
        self.lr_scheduler.load_state_dict(
            torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))
        return None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not isinstance(self.model, AdaptedModule):
            return super()._save(output_dir, state_dict)
        if state_dict is not None:  # only FSDP, DeepSpeed and SageMaker gather one
            raise FxpeftError("fxpeft.Trainer saves adapters from the graph's own tensors; "
                              f"DeepSpeed is not supported: use DDP, or FSDP2: {_SHARD_FIRST}")
        if not self.args.should_save:  # not the main process
            return None
        folder = output_dir if output_dir is not None else self.args.output_dir
        save_adapters(self.model, folder)
        self._save_extras(folder)
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        target = self.model if model is None else model
        if not isinstance(target, AdaptedModule):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        restore_adapters(target, resume_from_checkpoint)
        return None

    def _load_best_model(self) -> None:
        if not isinstance(self.model, AdaptedModule):
            return super()._load_best_model()
        return self._load_from_checkpoint(self.state.best_model_checkpoint)


@functools.cache
def with_adapter_checkpoints(trainer_class: type) -> type:
    """``trainer_class`` (a ``transformers.Trainer`` subclass) with ``AdapterCheckpoints``.

    >>> import trl  # doctest: +SKIP
    >>> SFTTrainer = with_adapter_checkpoints(trl.SFTTrainer)  # doctest: +SKIP
    """
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, transformers.Trainer)):
        raise FxpeftError(f"with_adapter_checkpoints: {trainer_class!r} is not a transformers.Trainer subclass")
    name = "FxpeftTrainer" if trainer_class is transformers.Trainer else f"Fxpeft{trainer_class.__name__}"
    return type(name, (AdapterCheckpoints, trainer_class), {"__module__": __name__})


class Trainer(AdapterCheckpoints, transformers.Trainer):
    """``transformers.Trainer`` for fxpeft graphs: checkpoints are adapter folders, resuming
    restores them. Any other model is handled as the stock Trainer handles it.

    >>> import torch, fxpeft, tempfile
    >>> from transformers import TrainingArguments
    >>> gm = fxpeft.rewrite(torch.nn.Sequential(torch.nn.Linear(2, 2)),
    ...                     fxpeft.rules.Rule(where=fxpeft.rules.Where(path=["0"])))
    >>> out = tempfile.mkdtemp()
    >>> trainer = fxpeft.Trainer(model=gm, args=TrainingArguments(out, report_to=[], use_cpu=True))
    >>> trainer.save_model(out + "/final")
    >>> sorted(os.listdir(out + "/final"))
    ['adapter_config.json', 'adapter_model.safetensors', 'fxpeft_rules.toml', 'training_args.bin']
    """
