"""The shape of the code: no import cycles, and a kind registry that every consumer reads."""

import ast
import logging
from pathlib import Path

import networkx as nx

import fxpeft
from conftest import tiny_llama
from fxpeft import registry
from fxpeft.rules.loader import parse_rules

PACKAGE = Path(fxpeft.__file__).parent


def _module_name(path: Path) -> str:
    parts = ["fxpeft", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imported(node: ast.AST, modules: dict[str, Path]) -> list[str]:
    """fxpeft modules an import statement names (``from pkg import submodule`` counts the
    submodule; imports under ``if TYPE_CHECKING:`` are skipped by the caller)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in modules]
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fxpeft"):
        subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
        return subs or ([node.module] if node.module in modules else [])
    return []


def _top_level_imports(tree: ast.Module) -> list[ast.AST]:
    """Import statements run at import time: module level, and inside plain ``if``/``try``
    blocks, but not ``if TYPE_CHECKING:`` (annotations only)."""
    found, stack = [], list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and not (isinstance(node.test, ast.Name)
                                               and node.test.id == "TYPE_CHECKING"):
            stack.extend(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            stack.extend(node.body + node.orelse + node.finalbody)
    return found


def import_graph() -> nx.DiGraph:
    modules = _modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        for node in _top_level_imports(ast.parse(path.read_text())):
            graph.add_edges_from((name, target) for target in _imported(node, modules)
                                 if target != name)
    return graph


def test_the_module_import_graph_has_no_cycle():
    graph = import_graph()
    assert graph.number_of_edges() > 40  # the scan sees the real imports
    assert ("fxpeft.runtime.rewrite", "fxpeft.capture.export") in graph.edges
    cycles = list(nx.simple_cycles(graph))
    assert cycles == [], cycles[:5]


def test_no_function_level_import_of_fxpeft_modules():
    """Imports inside functions only ever dodged cycles; none may remain."""
    modules, offenders = _modules(), []
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        for func in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            for node in ast.walk(func):
                if _imported(node, modules):
                    offenders.append(f"{name}:{node.lineno}")
    assert offenders == []


def test_names_is_a_leaf():
    assert list(import_graph().successors("fxpeft.names")) == []


REQUIRED_PARAMS = {"adalora": "total_step = 10"}  # params a rule must give (no default)


def rule_params(kind: registry.AdapterKind):
    """The params a rule file saying ``rewrite = <kind>`` gets."""
    text = (f'[[rule]]\nmatch = "{kind.sites[0]}"\nrewrite = "{kind.name}"\n'
            f'[rule.params]\n{REQUIRED_PARAMS.get(kind.name, "")}\n')
    return parse_rules(text, "kind.toml").rules[0].params


def test_every_kind_is_complete():
    for kind in registry.all_kinds():
        assert callable(kind.splice) and kind.components
        assert callable(kind.merge) or (isinstance(kind.merge, str) and kind.merge)
        if kind.params is not None:
            assert kind.params.kind == kind.name and kind.sites
            assert type(rule_params(kind)) is kind.params  # the rule loader reads the registry
        assert len(set(kind.components)) == len(kind.components)  # kinds may share (DoRA: LoRA's A, B)


# Rules in the reverse of the pass order: the passes still run in registration order
# (fxpeft/kinds/builtin.py's BUILTIN), one per kind that has matches.
RULES_AGAINST_PASS_ORDER = """
[[rule]]
match = "attention"
rewrite = "adaption_prompt"
[[rule]]
match = "linear"
rewrite = "ia3"
[rule.where]
path = ['k_proj$']
[[rule]]
match = "linear"
rewrite = "lora"
[rule.where]
path = ['q_proj$']
"""


def test_the_kinds_passes_run_in_registration_order_whatever_the_rule_order(caplog):
    with caplog.at_level(logging.INFO, logger="fxpeft"):
        fxpeft.rewrite(tiny_llama(), parse_rules(RULES_AGAINST_PASS_ORDER))
    ran = [r.getMessage().split()[2].rstrip(":") for r in caplog.records
           if r.getMessage().startswith("fxpeft pass ")]
    assert ran == ["lora", "ia3", "adaption_prompt"]


def test_no_consumer_lists_kinds_by_hand():
    """Only kind files, the registration list and the registry may name a kind's components."""
    components = {c for k in registry.all_kinds() for c in k.components} - {"modules_to_save"}
    allowed = {"fxpeft.registry", "fxpeft.kinds.builtin", "fxpeft.formats.peft_format"} | {
        f"fxpeft.kinds.{k.name}" for k in registry.all_kinds()}
    offenders = []
    for name, path in _modules().items():
        if name in allowed:
            continue
        strings = {n.value for n in ast.walk(ast.parse(path.read_text()))
                   if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        offenders += [f"{name}: {c}" for c in components if c in strings]
    assert offenders == []
