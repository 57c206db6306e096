"""FSDP2 over an adapted graph, layer by layer: ``shard_layers`` (``fxpeft.layer_units``, then
``fully_shard`` on each layer and on the graph); ``accelerate_prepare``, accelerate's
``prepare`` for such a graph (on the CPU too, where accelerate has no FSDP), with adapter-only
``save_state`` / ``load_state``; and ``GatheredBytes``, which counts the parameter bytes FSDP
holds gathered (unsharded) at each of its unshard / reshard points, the memory figure a CPU run
can measure (it has no allocator statistics).

>>> from fxpeft.helpers.sharding import GatheredBytes, accelerate_prepare, shard_layers
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch

from fxpeft.errors import FxpeftError
from fxpeft.io.checkpoints import restore_adapters, save_adapters
from fxpeft.io.serialize import has_sharded_adapters
from fxpeft.runtime.adapted_module import AdaptedModule, is_fsdp_sharded
from fxpeft.transforms.units import layer_modules, layer_units


def shard_layers(gm: torch.fx.GraphModule, mesh: Any = None, mp_policy: Any = None,
                 reshard_after_forward: bool = True) -> torch.fx.GraphModule:
    """A copy of ``gm`` (``fxpeft.layer_units``) sharded by FSDP2: ``fully_shard`` on each
    layer, then on the copy (embeddings, final norm, head). Call on every rank, in a process
    group; ``mesh`` and ``mp_policy`` go to every ``fully_shard``. Only what requires grad (the
    adapters) gets gradients, so an optimizer over ``trainable_parameters`` keeps state only for
    this rank's shard of the adapters.

    >>> import torch.distributed as dist  # doctest: +SKIP
    >>> sharded = shard_layers(gm)  # doctest: +SKIP
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    units = layer_units(gm)
    options = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy(),
               "reshard_after_forward": reshard_after_forward}
    for layer in layer_modules(units):
        fully_shard(layer, **options)
    fully_shard(units, **options)
    return units


@contextlib.contextmanager
def without_ddp(accelerator: Any) -> Iterator[None]:
    """``accelerator.prepare`` keeps an already sharded graph as it is (its autocast still
    applied) instead of wrapping it in DDP, which refuses DTensor parameters: the path
    ``Trainer._prepare_for_training`` takes for a model sharded at load time.

    >>> from types import SimpleNamespace
    >>> with without_ddp(SimpleNamespace(prepare_model=print)): pass
    """
    prepare_model = accelerator.prepare_model

    def prepare_sharded(model: torch.nn.Module, device_placement: bool | None = None,
                        evaluation_mode: bool = False) -> torch.nn.Module:
        evaluation_mode = evaluation_mode or is_fsdp_sharded(model)  # no DDP, no placement
        return prepare_model(model, device_placement=device_placement, evaluation_mode=evaluation_mode)

    accelerator.prepare_model = prepare_sharded
    try:
        yield
    finally:
        del accelerator.prepare_model  # the class's method again


def _plugin_options(accelerator: Any) -> dict[str, Any]:
    """``shard_layers``' options from accelerate's FSDP plugin where accelerate turned FSDP on
    (with accelerators); refuses the setups that cannot shard an fxpeft graph."""
    kind = str(getattr(accelerator, "distributed_type", "NO")).rsplit(".", 1)[-1]
    if kind in ("DEEPSPEED", "MEGATRON_LM"):
        raise FxpeftError(f"accelerate_prepare: {kind} partitions parameters the fxpeft graph reads "
                          f"directly; use FSDP2 (FullyShardedDataParallelPlugin(fsdp_version=2)) or DDP")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != world:
        raise FxpeftError(f"accelerate_prepare: accelerate runs {accelerator.num_processes} of the "
                          f"{world} processes launched (on the CPU accelerate runs several only with "
                          f"Accelerator(cpu=True) or `accelerate launch --cpu`); pass cpu=True")
    if kind != "FSDP":  # the CPU (accelerate ignores the plugin there), or plain DDP
        return {}
    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version != 2:
        raise FxpeftError(f"accelerate_prepare: FSDP version {plugin.fsdp_version} wraps modules the "
                          f"flat fxpeft graph never calls; use FullyShardedDataParallelPlugin(fsdp_version=2)")
    policy = plugin.mixed_precision_policy
    return {"mp_policy": policy if type(policy).__name__ == "MixedPrecisionPolicy" else None,
            "reshard_after_forward": plugin.reshard_after_forward is not False}


def _onto_sharded(optimizer: torch.optim.Optimizer, flat: torch.nn.Module, sharded: torch.nn.Module) -> None:
    """Point ``optimizer`` (made over ``flat``'s parameters) at ``sharded``'s, by name, as
    accelerate's own FSDP2 preparation does."""
    if optimizer.state:
        raise FxpeftError("accelerate_prepare: the optimizer has taken steps; prepare before the first step")
    names = {id(p): name for name, p in flat.named_parameters()}
    now = dict(sharded.named_parameters())
    for group in optimizer.param_groups:
        group["params"] = [now[names[id(p)]] if id(p) in names else p for p in group["params"]]


class WholeOptimizerState:
    """Makes ``optimizer.state_dict()`` of a sharded graph's optimizer the whole state (gathered
    on rank 0: a collective, every rank calls it, as accelerate's ``save_state`` does) and
    ``optimizer.load_state_dict(whole)`` keep each rank's shard of it, through the optimizer's
    own state-dict hooks: a checkpoint holds one optimizer file that any rank count reads."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.inside = model, False
        optimizer.register_state_dict_post_hook(self.gathered)
        optimizer.register_load_state_dict_pre_hook(self.scattered)

    @contextlib.contextmanager
    def _own_call(self) -> Iterator[None]:
        self.inside = True  # torch's (get|set)_optimizer_state_dict call the hooked methods
        try:
            yield
        finally:
            self.inside = False

    def gathered(self, optimizer: torch.optim.Optimizer, local: dict) -> dict | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        if self.inside or not optimizer.state:  # torch would take a zero step to make one
            return None
        with self._own_call():
            return get_optimizer_state_dict(self.model, optimizer, options=StateDictOptions(
                full_state_dict=True, cpu_offload=True))

    def scattered(self, optimizer: torch.optim.Optimizer, whole: dict) -> dict | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        named = any(isinstance(p, str) for group in whole["param_groups"] for p in group["params"])
        if self.inside or not named:  # a stateless optimizer's own dict (gathered returned it)
            return None
        with self._own_call():
            set_optimizer_state_dict(self.model, optimizer, whole, options=StateDictOptions(full_state_dict=True))
            return optimizer.state_dict()  # loaded already: what the caller's load then reloads


def _adapter_checkpoints(accelerator: Any, sharded: torch.nn.Module) -> None:
    """``save_state`` writes ``sharded``'s adapters (PEFT's folder, rank 0; no base weights)
    instead of its whole state dict, and ``load_state`` restores them (each rank its shard)."""
    def save(models: list, weights: list, folder: str) -> None:
        for index in reversed(range(len(models))):
            if models[index] is sharded:
                save_adapters(sharded, folder)  # every rank gathers; rank 0 writes
                if index < len(weights):  # accelerate's FSDP saves through its own path instead
                    weights.pop(index)

    def load(models: list, folder: str) -> None:
        for index in reversed(range(len(models))):
            if models[index] is sharded:
                restore_adapters(sharded, folder)
                models.pop(index)  # accelerate has no weights file of it to read
    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def accelerate_prepare(accelerator: Any, gm: torch.nn.Module, *objects: Any) -> tuple[Any, ...]:
    """``accelerator.prepare(gm, *objects)`` for FSDP2 layer by layer: ``gm`` (an adapted graph,
    sharded here with ``shard_layers`` unless it is already) reaches accelerate already
    sharded, so accelerate's FSDP2 plugin (with accelerators: its mixed precision policy and
    ``reshard_after_forward`` are used here) keeps it as it is, and on the CPU, where accelerate
    ignores FSDP plugins and would wrap the graph in DDP, it is prepared without DDP (FSDP2's
    reduce-scatter averages the gradients); data loaders are split per rank as usual. An
    optimizer made over ``gm``'s parameters is pointed at the sharded ones, and its
    ``state_dict`` is then the whole state; ``accelerator.save_state`` writes the adapter as a
    PEFT folder (no base weights) and ``load_state`` restores it. Call on every rank; returns
    what ``prepare`` returns, the sharded graph first.

    >>> from accelerate import Accelerator  # doctest: +SKIP
    >>> gm, optimizer, loader = accelerate_prepare(Accelerator(cpu=True), gm, optimizer, loader)  # doctest: +SKIP
    """
    if not isinstance(gm, AdaptedModule):
        raise FxpeftError(f"accelerate_prepare: expected an fxpeft graph first, got {type(gm).__name__}")
    options = _plugin_options(accelerator)
    sharded = gm if has_sharded_adapters(gm) else shard_layers(gm, **options)
    for optimizer in (o for o in objects if isinstance(o, torch.optim.Optimizer)):
        _onto_sharded(optimizer, gm, sharded)
        WholeOptimizerState(sharded, optimizer)
    if str(accelerator.distributed_type).endswith("FSDP"):  # accelerate keeps an FSDPModule
        prepared = accelerator.prepare(sharded, *objects)
    else:
        with without_ddp(accelerator):
            prepared = accelerator.prepare(sharded, *objects)
    _adapter_checkpoints(accelerator, sharded)
    return prepared if isinstance(prepared, tuple) else (prepared,)


def _groups(model: torch.nn.Module) -> list[Any]:
    from torch.distributed.fsdp import fully_shard
    states = (fully_shard.state(m) for m in model.modules() if is_fsdp_sharded(m))
    return [s._fsdp_param_group for s in states if s._fsdp_param_group is not None]


def _unsharded_bytes(group: Any) -> int:
    """What ``group``'s parameters take gathered, in the dtype FSDP gathers them in."""
    return sum(p._orig_size.numel() * (getattr(p, "param_dtype", None) or p.sharded_param.dtype).itemsize
               for p in group.fsdp_params)


class GatheredBytes:
    """Counts the bytes of gathered parameters over all of ``model``'s FSDP groups, sampled
    right after each group's pre-forward and pre-backward gather and right before each
    post-forward and post-backward free. ``peak`` is the most seen at once; ``total`` what every
    group takes gathered (the whole model's parameters).

    FSDP2 has no public hook at its gathers; this wraps ``FSDPParamGroup``'s four methods for
    the ``with`` block (a measuring tool for tests, examples and benchmarks, not for training).
    """

    _POINTS = {"pre_forward": "after", "post_forward": "before", "pre_backward": "after",
               "post_backward": "before"}

    def __init__(self, model: torch.nn.Module) -> None:
        self.groups = _groups(model)
        self.total = sum(_unsharded_bytes(g) for g in self.groups)
        self.peak = 0

    def sample(self) -> int:
        """The bytes gathered now (and the peak updated)."""
        now = sum(_unsharded_bytes(g) for g in self.groups if g.is_unsharded)
        self.peak = max(self.peak, now)
        return now

    def _wrap(self, method: Any, when: str) -> Any:
        def wrapped(group: Any, *args: Any, **kwargs: Any) -> Any:
            if when == "before":
                self.sample()
            result = method(group, *args, **kwargs)
            if when == "after":
                self.sample()
            return result
        return wrapped

    @contextlib.contextmanager
    def counting(self) -> Iterator["GatheredBytes"]:
        """Sample at every gather and free inside the block."""
        from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
        originals = {name: getattr(FSDPParamGroup, name) for name in self._POINTS}
        try:
            for name, when in self._POINTS.items():
                setattr(FSDPParamGroup, name, self._wrap(originals[name], when))
            yield self
        finally:
            for name, method in originals.items():
                setattr(FSDPParamGroup, name, method)
