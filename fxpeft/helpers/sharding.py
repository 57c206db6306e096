"""FSDP2 over an adapted graph, layer by layer: ``shard_layers`` (``fxpeft.layer_units``, then
``fully_shard`` on each layer and on the graph), and ``GatheredBytes``, which counts the
parameter bytes FSDP holds gathered (unsharded) at each of its unshard / reshard points, the
memory figure a CPU run can measure (it has no allocator statistics).

>>> from fxpeft.helpers.sharding import GatheredBytes, shard_layers
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

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


def _groups(model: torch.nn.Module) -> list[Any]:
    from torch.distributed.fsdp import FSDPModule, fully_shard
    states = (fully_shard.state(m) for m in model.modules() if isinstance(m, FSDPModule))
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
