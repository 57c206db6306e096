"""Names and node records shared across fxpeft. A leaf: it imports nothing from fxpeft.

Every node a pass adds carries a typed record in ``node.meta``: an ``AdapterNode`` (its kind,
adapter, site and bypass) under ``ADAPTER_META``, or, for the nodes that read an adapter's on/off
gate, the adapter's name under ``GATE_META``. Strip, merge, save and explain read these records;
none of them knows a kind by name.

>>> record = AdapterNode("lora", "default", "q_proj", bypass=0)
>>> record.removable, adapter_component("lora_A", "sql")
(True, 'lora_A_sql')
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ADAPTER_META = "fxpeft_adapter"        # node.meta key: an AdapterNode
GATE_META = "fxpeft_gate"              # node.meta key: the adapter whose gate the node reads
PER_SAMPLE_META = "fxpeft_per_sample"  # node.meta key: the shared per-sample gate call
GATES = "fxpeft_gates"                 # submodule holding one gate buffer per adapter
SLOTS = "fxpeft_slots"                 # a serving copy's preallocated adapter slots
INPUTS_MODULE = "fxpeft_inputs"        # first node of an HF graph
OUTPUT_MODULE = "fxpeft_output"        # last node of an HF graph
DROPOUT_MODULE = "fxpeft_dropout"      # every dropout in an emitted graph calls it
LM_LOSS_MODULE = "fxpeft_lm_loss"      # a fused graph's LM head and loss
MODULES_TO_SAVE = "modules_to_save"
BASE_ADAPTER = "__base__"              # PEFT's per-sample name for "no adapter"
DEFAULT_ADAPTER = "default"
PEFT_PREFIX = "base_model.model."
_IDENTIFIER = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class AdapterNode:
    """What a pass records on each node it adds.

    ``bypass``: removing the adapter replaces this node by its ``args[bypass]`` (the node that
    joins the branch into the base flow); None for interior nodes, which die with their join.
    ``detail``: the kind's own frozen record (targets and numbers its merger needs).
    """

    kind: str
    adapter: str
    module_path: str
    bypass: int | None = None
    detail: Any = None

    @property
    def removable(self) -> bool:
        return self.bypass is not None


def adapter_node(node: Any) -> AdapterNode | None:
    """The ``AdapterNode`` record of an fx node, or None for base nodes."""
    return node.meta.get(ADAPTER_META)


def owning_adapter(node: Any) -> str | None:
    """The adapter an fx node belongs to: by its record, or by the gate it reads."""
    record = adapter_node(node)
    return record.adapter if record is not None else node.meta.get(GATE_META)


def is_fxpeft_node(node: Any) -> bool:
    """Whether a pass (not the captured model) put ``node`` in the graph."""
    return any(key in node.meta for key in (ADAPTER_META, GATE_META, PER_SAMPLE_META))


def adapter_component(base: str, adapter: str) -> str:
    """The name component ``base`` (``lora_A``) takes for ``adapter``: the default adapter keeps
    PEFT's plain name, others get their name appended, so several adapters share one module.

    >>> adapter_component("lora_A", "default"), adapter_component("lora_A", "sql")
    ('lora_A', 'lora_A_sql')
    """
    return base if adapter == DEFAULT_ADAPTER else f"{base}_{adapter}"


def component_base(part: str, components: Any) -> str | None:
    """Which of ``components`` the name part ``part`` is (for any adapter), or None.

    >>> component_base("lora_A_sql", ["lora_A", "lora_B"]), component_base("q_proj", ["lora_A"])
    ('lora_A', None)
    """
    for base in components:
        if part == base or (part.startswith(f"{base}_") and _IDENTIFIER.match(part[len(base) + 1:])):
            return base
    return None


def cache_root() -> Path:
    """``$FXPEFT_CACHE`` or ``~/.cache/fxpeft``."""
    return Path(os.environ.get("FXPEFT_CACHE", Path.home() / ".cache" / "fxpeft"))
