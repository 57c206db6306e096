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

Optimizer, scheduler, RNG and trainer state are the stock Trainer's, untouched.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import transformers
from transformers.trainer import TRAINING_ARGS_NAME

from fxpeft.errors import FxpeftError
from fxpeft.runtime.adapted_module import AdaptedModule
from fxpeft.io.checkpoints import restore_adapters, save_adapters


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

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not isinstance(self.model, AdaptedModule):
            return super()._save(output_dir, state_dict)
        if state_dict is not None:  # only FSDP, DeepSpeed and SageMaker gather one
            raise FxpeftError("fxpeft.Trainer saves adapters from the graph's own tensors; a "
                              "sharded setup (FSDP, DeepSpeed) is not supported: use DDP")
        if not self.args.should_save:  # not the main process
            return None
        folder = output_dir if output_dir is not None else self.args.output_dir
        save_adapters(self.model, folder)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(folder)
        torch.save(self.args, os.path.join(folder, TRAINING_ARGS_NAME))  # as the stock Trainer
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
