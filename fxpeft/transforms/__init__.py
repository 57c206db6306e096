"""Rewrite passes: each consumes match records of one rewrite kind and splices the graph."""

from fxpeft.transforms.base import PassResult, RewritePass, run_passes
from fxpeft.transforms.lora import LoraPass

__all__ = ["LoraPass", "PassResult", "RewritePass", "default_passes", "run_passes"]


def default_passes() -> list[RewritePass]:
    """The rewrite passes, in the order they run. New adapter kinds add their pass here."""
    return [LoraPass()]
