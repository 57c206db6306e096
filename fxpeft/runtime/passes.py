"""The pass protocol and the pass manager.

Every pass has one shape, whether it is an adapter kind's rewrite pass (``KindPass``, one per
registered kind) or an optimisation pass over a fused copy or a decode graph (``GraphPass``,
``fxpeft.transforms.fuse.GRAPH_PASSES``):

- ``name``;
- ``does``: what it is for (how a pipeline asks for it: ``select``);
- ``requires``: the facts about the graph (``FACTS``) that must hold when it runs;
- ``ensures`` and ``invalidates``: the facts that hold, and no longer hold, after it;
- ``after``: passes that must run before it when both are in one pipeline;
- ``run(gm, context) -> PassResult``: what it changed.

The manager (``run_pipeline``) checks the order against those declarations before anything runs
(``check_order``), runs each pass, checks what a kind pass ensures about the nodes it added
(every added node carries its kind's record; each splice has a removable node; a node that is not
removable is read only by adapter nodes, so it dies with its join), lints, logs each
``PassResult``, and names the failing pass and those before it in any error.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Protocol

import torch.fx

from fxpeft.errors import FxpeftError, PassError
from fxpeft import registry
from fxpeft.registry import AdapterKind, SpliceInput, Spliced
from fxpeft.names import DEFAULT_ADAPTER, adapter_node, is_fxpeft_node

log = logging.getLogger("fxpeft")
WorkItem = tuple[Any, Any]  # (site, params) for one splice

# The facts passes declare about the graph they run on (``requires`` / ``ensures`` /
# ``invalidates``); a pipeline starts from the facts of the graph it runs on.
FACTS = {
    "aten_linear": "linears are aten.linear calls (onednn_linear turns frozen ones into oneDNN calls)",
    "every_adapter": "every adapter's nodes are in the graph (drop_inactive keeps the active ones)",
    "lora_branches": "each low-rank branch is nodes of its own (gather_lora joins a site's into one call)",
    "explicit_lora_scale": "each low-rank branch ends in up * scale (fold_lora_scale moves it onto the gate)",
    "flat_layers": "layers are inline nodes, not regions (checkpoint_layers, region_layers)",
    "no_cast_leftovers": "no cast to the dtype a tensor already has is left (strip_leftovers)",
    "eval_only": "the graph never trains (the decode graph)",
}
ADAPTED = frozenset({"aten_linear", "every_adapter", "lora_branches", "explicit_lora_scale",
                     "flat_layers"})  # an emitted, adapted graph (and a fresh copy of one)
DECODING = ADAPTED | {"eval_only"}


@dataclass(frozen=True)
class PassResult:
    """What one pass did: ``changed`` (counted in ``unit``: a kind pass's matches spliced, a graph
    pass's places changed), the net nodes and parameters added, its time, and a kind pass's
    splices (``added``, dropped from the reports a graph keeps). ``str(result)`` is its one-line
    report."""

    name: str
    changed: int
    unit: str = "changes"
    nodes_added: int = 0
    parameters_added: int = 0
    seconds: float = 0.0
    added: tuple[Spliced, ...] = ()

    @property
    def matches(self) -> int:
        return self.changed

    def __str__(self) -> str:
        return (f"{self.name}: {self.changed} {self.unit}, {self.nodes_added:+d} nodes, "
                f"{self.parameters_added:+,d} parameters ({self.seconds * 1000:.0f} ms)")


@dataclass(frozen=True)
class PassContext:
    """What a pipeline hands every pass: the adapter being spliced and each kind's work items
    (empty for graph passes)."""

    adapter: str = DEFAULT_ADAPTER
    work: Mapping[str, list[WorkItem]] = field(default_factory=dict)


class Pass(Protocol):
    """The one pass shape (see the module docstring)."""

    name: str
    does: frozenset[str]
    requires: frozenset[str]
    ensures: frozenset[str]
    invalidates: frozenset[str]
    after: tuple[str, ...]

    def run(self, gm: torch.fx.GraphModule, context: PassContext) -> PassResult: ...

    def check(self, gm: torch.fx.GraphModule, before: set[torch.fx.Node], result: PassResult,
              context: PassContext) -> None:
        """What it ensures beyond facts, checked by the manager after it ran (raises)."""


def _facts(names: Iterable[str]) -> frozenset[str]:
    unknown = sorted(set(names) - set(FACTS))
    if unknown:
        raise ValueError(f"unknown pass facts {unknown}; facts: {sorted(FACTS)}")
    return frozenset(names)


@dataclass(frozen=True)
class KindPass:
    """The rewrite pass of one adapter kind: one splice per work item of its kind.

    >>> import fxpeft
    >>> KindPass(registry.get("lora")).name, sorted(KindPass(registry.get("lora")).requires)[:2]
    ('lora', ['aten_linear', 'every_adapter'])
    """

    kind: AdapterKind
    does: frozenset[str] = frozenset({"splices"})
    requires: frozenset[str] = ADAPTED
    ensures: frozenset[str] = frozenset()
    invalidates: frozenset[str] = frozenset()
    after: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.kind.name

    def run(self, gm: torch.fx.GraphModule, context: PassContext) -> PassResult:
        items = context.work.get(self.name, [])
        added = tuple(self.kind.splice(SpliceInput(gm, site, params, context.adapter))
                      for site, params in items)
        return PassResult(self.name, len(items), "matches", added=added)

    def check(self, gm: torch.fx.GraphModule, before: set[torch.fx.Node], result: PassResult,
              context: PassContext) -> None:
        """Every node it added carries a record of this kind and adapter (``check_ensures``)."""
        check_ensures(result.added, context.adapter, self.name)
        stray = [n.name for n in gm.graph.nodes if n not in before and not is_fxpeft_node(n)]
        if stray:
            raise PassError(f"nodes {stray[:3]} were added without a record")


@dataclass(frozen=True)
class GraphPass:
    """An optimisation pass: ``transform(gm)`` changes ``gm`` in place and returns how many places
    it changed. ``specialises``: what it leaves depends on which adapters are active, so a copy
    it ran on is kept per active set and refuses to run under another (``drop_inactive``)."""

    name: str
    transform: Callable[[torch.fx.GraphModule], int]
    does: frozenset[str]
    requires: frozenset[str] = frozenset()
    ensures: frozenset[str] = frozenset()
    invalidates: frozenset[str] = frozenset()
    after: tuple[str, ...] = ()
    specialises: bool = False

    def __post_init__(self) -> None:
        for name in ("requires", "ensures", "invalidates"):
            object.__setattr__(self, name, _facts(getattr(self, name)))
        object.__setattr__(self, "does", frozenset(self.does))

    def run(self, gm: torch.fx.GraphModule, context: PassContext) -> PassResult:
        return PassResult(self.name, self.transform(gm))

    def check(self, gm: torch.fx.GraphModule, before: set[torch.fx.Node], result: PassResult,
              context: PassContext) -> None:
        """Nothing beyond its facts and the lint the manager runs."""


def check_order(passes: list[Pass], facts: frozenset[str]) -> None:
    """Raise ``PassError`` unless every pass's ``requires`` holds where it runs, starting from
    ``facts``, and every pass it must run ``after`` that is in the list runs before it.

    >>> noop = lambda gm: 0
    >>> late = GraphPass("late", noop, {"slims"}, invalidates={"aten_linear"})
    >>> reads = GraphPass("reads", noop, {"slims"}, requires={"aten_linear"})
    >>> check_order([reads, late], ADAPTED)
    >>> check_order([late, reads], ADAPTED)
    Traceback (most recent call last):
    ...
    fxpeft.errors.PassError: pass 'reads' requires aten_linear (linears are aten.linear calls (onednn_linear turns frozen ones into oneDNN calls)), which 'late' before it breaks
    """
    names = [p.name for p in passes]
    broken_by: dict[str, str] = {}
    for index, graph_pass in enumerate(passes):
        for fact in sorted(graph_pass.requires - facts):
            by = f"which {broken_by[fact]!r} before it breaks" if fact in broken_by else \
                "which does not hold for this graph"
            raise PassError(f"pass {graph_pass.name!r} requires {fact} ({FACTS[fact]}), {by}")
        late = [n for n in graph_pass.after if n in names[index + 1:]]
        if late:
            raise PassError(f"pass {graph_pass.name!r} must run after {late}, which come later")
        broken_by.update({fact: graph_pass.name for fact in graph_pass.invalidates})
        facts = (facts - graph_pass.invalidates) | graph_pass.ensures


def select(catalog: Iterable[Pass], wants: set[str], facts: frozenset[str],
           skip: Iterable[str] = ()) -> list[Pass]:
    """The passes of ``catalog`` (in its order) that do something in ``wants`` and whose
    ``requires`` hold where they would run, starting from ``facts``: how a pipeline asks for
    passes by what they do. ``skip``: names the caller leaves out.

    >>> noop = lambda gm: 0
    >>> catalog = [GraphPass("a", noop, {"slims"}, invalidates={"explicit_lora_scale"}),
    ...            GraphPass("b", noop, {"slims"}, requires={"explicit_lora_scale"}),
    ...            GraphPass("c", noop, {"checkpoints"})]
    >>> [p.name for p in select(catalog, {"slims"}, ADAPTED)]
    ['a']
    """
    chosen, skipped = [], set(skip)
    for graph_pass in catalog:
        if graph_pass.name in skipped or not graph_pass.does & wants or \
                not graph_pass.requires <= facts:
            continue
        chosen.append(graph_pass)
        facts = (facts - graph_pass.invalidates) | graph_pass.ensures
    return chosen


def check_ensures(spliced: Iterable[Spliced], adapter: str, kind: str) -> None:
    """What every kind pass ensures about the nodes it added (raises ``PassError`` otherwise)."""
    for result in spliced:
        if not any(getattr(adapter_node(n), "removable", False) for n in result.nodes):
            raise PassError(f"a {kind} splice added no removable node (no record with a bypass)")
        for node in result.nodes:
            record = adapter_node(node)
            if record is None or record.kind != kind or record.adapter != adapter:
                raise PassError(f"node {node.name} carries no {kind} record of adapter {adapter!r}")
            if not record.removable and not all(is_fxpeft_node(u) for u in node.users):
                raise PassError(f"node {node.name} is read by a base node but has no bypass")


def _count_parameters(gm: torch.nn.Module) -> int:
    return sum(p.numel() for p in gm.parameters())


def run_pipeline(gm: torch.fx.GraphModule, passes: list[Pass], facts: frozenset[str],
                 context: PassContext = PassContext(), recompile: bool = True) -> list[PassResult]:
    """Run ``passes`` in order over ``gm`` (their order checked first, from ``facts``); returns
    one ``PassResult`` per pass. ``recompile=False`` leaves the code to regenerate once, after
    the pipeline (nothing runs the graph in between).

    >>> run_pipeline(None, [], ADAPTED)
    []
    """
    check_order(passes, facts)
    results: list[PassResult] = []
    for graph_pass in passes:
        results.append(_run_one(gm, graph_pass, context, results, recompile))
    return results


def _run_one(gm: torch.fx.GraphModule, graph_pass: Pass, context: PassContext,
             earlier: list[PassResult], recompile: bool) -> PassResult:
    before, params, start = set(gm.graph.nodes), _count_parameters(gm), time.perf_counter()
    try:
        result = graph_pass.run(gm, context)
        graph_pass.check(gm, before, result, context)
        gm.graph.lint()
        if recompile:
            gm.recompile()
    except Exception as err:
        ran = ", ".join(r.name for r in earlier) or "none"
        first_line = (str(err).strip().splitlines() or [""])[0][:500]
        detail = first_line if isinstance(err, FxpeftError) else f"{type(err).__name__}: {first_line}"
        raise PassError(f"pass {graph_pass.name!r} failed: {detail} (passes run before it: "
                        f"{ran})") from err
    result = dataclasses.replace(result, nodes_added=len(gm.graph.nodes) - len(before),
                                 parameters_added=_count_parameters(gm) - params,
                                 seconds=time.perf_counter() - start)
    log.info("fxpeft pass %s", result)
    return result


def run_passes(gm: torch.fx.GraphModule, work: dict[str, list[WorkItem]], adapter: str,
               passes: list[KindPass]) -> tuple[list[PassResult], list[Spliced]]:
    """Run the kind passes that have work items, in order; returns one report per pass run and
    everything the splices added.

    >>> run_passes(None, {}, "default", [])
    ([], [])
    """
    busy = [p for p in passes if work.get(p.name)]
    results = run_pipeline(gm, busy, ADAPTED, PassContext(adapter, work))
    spliced = [added for result in results for added in result.added]
    return [dataclasses.replace(result, added=()) for result in results], spliced


def default_passes() -> list[KindPass]:
    """The rewrite passes, in the order they run: one per registered kind.

    >>> import fxpeft
    >>> [p.name for p in default_passes()][:3]
    ['lora', 'ia3', 'adaption_prompt']
    """
    return [KindPass(kind) for kind in registry.all_kinds()]
