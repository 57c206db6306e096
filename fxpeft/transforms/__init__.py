"""Rewrite passes: each consumes match records of one rewrite kind and splices the graph."""

from fxpeft.transforms.adaption_prompt import AdaptionPromptPass
from fxpeft.transforms.base import PassResult, RewritePass, run_passes
from fxpeft.transforms.ia3 import IA3Pass
from fxpeft import peft_format_prompt_ia3  # noqa: F401,E402  PEFT formats of these passes' kinds
from fxpeft.transforms.lora import LoraPass

__all__ = ["AdaptionPromptPass", "IA3Pass", "LoraPass", "PassResult", "RewritePass", "default_passes",
           "run_passes"]


def default_passes() -> list[RewritePass]:
    """The rewrite passes, in the order they run. New adapter kinds add their pass here."""
    return [LoraPass(), IA3Pass(), AdaptionPromptPass()]
