"""Rewrite passes: one per registered adapter kind, run by the pass manager in registry order."""

from fxpeft.kinds import registry
from fxpeft.transforms.base import KindPass, PassResult, run_passes

__all__ = ["KindPass", "PassResult", "default_passes", "run_passes"]


def default_passes() -> list[KindPass]:
    """The rewrite passes, in the order they run: one per registered kind.

    >>> import fxpeft
    >>> [p.name for p in default_passes()][:3]
    ['lora', 'ia3', 'adaption_prompt']
    """
    return [KindPass(kind) for kind in registry.all_kinds()]
