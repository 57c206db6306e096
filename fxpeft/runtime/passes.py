"""The pass protocol and the pass manager.

There is one rewrite pass per registered adapter kind (``fxpeft.registry``). A pass gets
its inputs as arguments (the graph module, its work items, the adapter's name), splices, and
returns what it added. The manager runs passes in registry order, checks what each ensures
(every added node carries its kind's record or a gate record; each splice has a removable node;
a node that is not removable is read only by adapter nodes, so it dies with its join; the graph
lints), recompiles, logs name / match count / time, and names the failing pass and those before
it in any error.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch.fx

from fxpeft.errors import FxpeftError, PassError
from fxpeft import registry
from fxpeft.registry import AdapterKind, SpliceInput, Spliced
from fxpeft.names import adapter_node, is_fxpeft_node

log = logging.getLogger("fxpeft")
WorkItem = tuple[Any, Any]  # (site, params) for one splice


@dataclass(frozen=True)
class PassResult:
    """What one pass did: ``str(result)`` is its one-line report."""

    name: str
    matches: int
    nodes_added: int
    parameters_added: int
    seconds: float

    def __str__(self) -> str:
        return (f"{self.name}: {self.matches} matches, +{self.nodes_added} nodes, "
                f"+{self.parameters_added:,d} parameters ({self.seconds * 1000:.0f} ms)")


@dataclass(frozen=True)
class KindPass:
    """The rewrite pass of one adapter kind: one splice per work item.

    >>> import fxpeft
    >>> from fxpeft import registry
    >>> KindPass(registry.get("lora")).name
    'lora'
    """

    kind: AdapterKind

    @property
    def name(self) -> str:
        return self.kind.name

    def run(self, gm: torch.fx.GraphModule, work: list[WorkItem], adapter: str) -> list[Spliced]:
        return [self.kind.splice(SpliceInput(gm, site, params, adapter)) for site, params in work]


def check_ensures(spliced: list[Spliced], adapter: str, kind: str) -> None:
    """What every pass ensures about the nodes it added (raises ``PassError`` otherwise)."""
    for result in spliced:
        if not any(getattr(adapter_node(n), "removable", False) for n in result.nodes):
            raise PassError(f"a {kind} splice added no removable node (no record with a bypass)")
        for node in result.nodes:
            record = adapter_node(node)
            if record is None or record.kind != kind or record.adapter != adapter:
                raise PassError(f"node {node.name} carries no {kind} record of adapter {adapter!r}")
            if not record.removable and not all(is_fxpeft_node(u) for u in node.users):
                raise PassError(f"node {node.name} is read by a base node but has no bypass")


def _unrecorded(graph: torch.fx.Graph, before: set[torch.fx.Node]) -> list[str]:
    return [n.name for n in graph.nodes if n not in before and not is_fxpeft_node(n)]


def _count_parameters(gm: torch.nn.Module) -> int:
    return sum(p.numel() for p in gm.parameters())


def run_passes(gm: torch.fx.GraphModule, work: dict[str, list[WorkItem]], adapter: str,
               passes: list[KindPass]) -> tuple[list[PassResult], list[Spliced]]:
    """Run ``passes`` in order over their kind's work items; returns one report per pass run and
    everything the splices added.

    >>> run_passes(None, {}, "default", [])
    ([], [])
    """
    reports: list[PassResult] = []
    spliced: list[Spliced] = []
    for rewrite_pass in passes:
        items = work.get(rewrite_pass.name, [])
        if items:
            report, added = _run_one(gm, items, adapter, rewrite_pass, reports)
            reports.append(report)
            spliced.extend(added)
    return reports, spliced


def _run_one(gm: torch.fx.GraphModule, items: list[WorkItem], adapter: str,
             rewrite_pass: KindPass, earlier: list[PassResult]) -> tuple[PassResult, list[Spliced]]:
    before, params, start = set(gm.graph.nodes), _count_parameters(gm), time.perf_counter()
    try:
        added = rewrite_pass.run(gm, items, adapter)
        check_ensures(added, adapter, rewrite_pass.name)
        stray = _unrecorded(gm.graph, before)
        if stray:
            raise PassError(f"nodes {stray[:3]} were added without a record")
        gm.graph.lint()
        gm.recompile()
    except Exception as err:
        ran = ", ".join(r.name for r in earlier) or "none"
        first_line = (str(err).strip().splitlines() or [""])[0][:500]
        detail = first_line if isinstance(err, FxpeftError) else f"{type(err).__name__}: {first_line}"
        raise PassError(f"pass {rewrite_pass.name!r} failed: {detail} (passes run before it: "
                        f"{ran})") from err
    result = PassResult(rewrite_pass.name, len(items), len(gm.graph.nodes) - len(before),
                        _count_parameters(gm) - params, time.perf_counter() - start)
    log.info("fxpeft pass %s", result)
    return result, added


def default_passes() -> list[KindPass]:
    """The rewrite passes, in the order they run: one per registered kind.

    >>> import fxpeft
    >>> [p.name for p in default_passes()][:3]
    ['lora', 'ia3', 'adaption_prompt']
    """
    return [KindPass(kind) for kind in registry.all_kinds()]
