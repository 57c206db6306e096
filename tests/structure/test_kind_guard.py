"""Shared code never names a kind: what a kind needs beyond its splice is a capability it
declares on its ``AdapterKind`` (``fxpeft/registry.py``), and shared code calls it without
knowing which kind it is. Outside ``fxpeft/kinds/``, no module imports a kind's file (the
root package's registration import of ``kinds.builtin`` aside), compares anything with a kind's
name, looks a kind up by a literal name, or reads a kind's own parameter names or params fields
as attributes. The public keyword ``modules_to_save=`` and docstrings are not comparisons."""

import ast
import dataclasses

from fxpeft import registry
from fxpeft.rules.schema import Params
from test_architecture import _modules, _top_level_imports

KIND_FILES = {"fxpeft.kinds", "fxpeft.kinds.builtin"}  # the package and its registration list


def _kind_names() -> set[str]:
    return {kind.name for kind in registry.all_kinds()}


def _kind_own_attributes() -> set[str]:
    """A kind's component names (``lora_A``) and the params fields only one kind has
    (``init_text``): reading them as attributes is reaching into that kind."""
    shared = {f.name for f in dataclasses.fields(Params)} if dataclasses.is_dataclass(Params) else set()
    counts: dict[str, int] = {}
    for kind in registry.all_kinds():
        fields = {f.name for f in dataclasses.fields(kind.params)} if kind.params else set()
        for name in fields - shared:
            counts[name] = counts.get(name, 0) + 1
    own = {name for name, count in counts.items() if count == 1}
    return own | {c for kind in registry.all_kinds() for c in kind.components} - {"modules_to_save"}


def _strings(node: ast.AST) -> set[str]:
    """String constants of ``node``, itself or the elements of a tuple, list or set literal."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return {v for e in node.elts for v in _strings(e)}
    return set()


def kind_leaks(tree: ast.Module, module: str) -> list[str]:
    """Every place in ``tree`` that names a kind the ways the module docstring forbids."""
    names, attributes, found = _kind_names(), _kind_own_attributes(), []
    for node in _top_level_imports(tree):
        imported = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
        if isinstance(node, ast.ImportFrom) and node.module == "fxpeft.kinds":
            imported = [f"fxpeft.kinds.{a.name}" for a in node.names]
        found += [f"{module}:{node.lineno} imports {m}" for m in imported
                  if m and m.startswith("fxpeft.kinds") and not (module == "fxpeft" and m in KIND_FILES)]
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            named = {v for side in [node.left, *node.comparators] for v in _strings(side)} & names
            found += [f"{module}:{node.lineno} compares with kind {n!r}" for n in sorted(named)]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "get":
            named = {v for arg in node.args for v in _strings(arg)} & names
            found += [f"{module}:{node.lineno} looks up kind {n!r}" for n in sorted(named)]
        elif isinstance(node, ast.Attribute) and node.attr in attributes:
            found.append(f"{module}:{node.lineno} reads .{node.attr}")
    return sorted(found, key=lambda leak: int(leak.split(":")[1].split(" ")[0]))


def test_no_module_outside_kinds_names_a_kind():
    leaks = []
    for module, path in _modules().items():
        if not module.startswith("fxpeft.kinds"):
            leaks += kind_leaks(ast.parse(path.read_text()), module)
    assert leaks == []


def test_the_guard_sees_each_way_of_naming_a_kind():
    source = '''
from fxpeft.kinds.lora import LoraParams
from fxpeft.kinds import adalora
if record.kind == "lora" or record.kind in ("dora", "ia3"):
    target = record.detail.lora_A
    text = rule.params.init_text
kind = registry.get("prompt_tuning")
'''
    leaks = kind_leaks(ast.parse(source), "fxpeft.transforms.example")
    assert [leak.split(" ", 1)[1] for leak in leaks] == [
        "imports fxpeft.kinds.lora", "imports fxpeft.kinds.adalora",
        "compares with kind 'lora'", "compares with kind 'dora'", "compares with kind 'ia3'",
        "reads .lora_A", "reads .init_text", "looks up kind 'prompt_tuning'"]
    assert kind_leaks(ast.parse('"""Docstrings may say lora."""\nx = f(modules_to_save=[])'), "m") == []


def test_every_capability_is_declared_by_a_kind():
    """Each capability field of ``AdapterKind`` has a kind that uses it (or it is dead)."""
    capabilities = ("keyword_sites", "low_rank", "lengthens", "on_step", "fills_cache")
    for name in capabilities:
        assert any(getattr(kind, name) is not None for kind in registry.all_kinds()), name
    assert sum(kind.default_rule for kind in registry.all_kinds()) == 1


def test_emit_leaves_the_program_it_was_given_as_it_was():
    import torch
    from fxpeft.capture.export import capture
    from fxpeft.runtime.emit import emit
    program = capture(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    before = program.graph_module
    gm = emit(program)
    assert program.graph_module is before and gm is not before
