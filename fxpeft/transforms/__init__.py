"""Rewrite passes: each consumes match records of one rewrite kind and splices the graph."""

from fxpeft import peft_format_prompt_ia3  # noqa: F401  PEFT formats of the IA3 / prompt kinds
from fxpeft.transforms import adaption_prompt, ia3, lora
from fxpeft.transforms.base import PassResult, RewritePass, SplicePass, run_passes

__all__ = ["PassResult", "RewritePass", "SplicePass", "default_passes", "run_passes"]


def default_passes() -> list[RewritePass]:
    """The rewrite passes, in the order they run. New adapter kinds add their pass here.

    >>> [p.name for p in default_passes()]
    ['lora', 'ia3', 'adaption_prompt']
    """
    return [SplicePass("lora", lora.splice_lora), SplicePass("ia3", ia3.splice_ia3),
            SplicePass("adaption_prompt", adaption_prompt.splice_adaption_prompt)]
