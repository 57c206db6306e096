"""The pipeline as folders: each folder (or root leaf module) is a layer, and imports point only
down the declared order. Package ``__init__`` modules count as their folder, so an import of
``fxpeft.rules.loader`` that runs ``fxpeft/rules/__init__.py`` carries that file's imports too.
The root package ``fxpeft/__init__.py`` is the top: every import runs it, and it imports the
public face."""

import tomllib
from pathlib import Path

import networkx as nx

from conftest import REPO_ROOT
from test_architecture import PACKAGE, import_graph

# Bottom first. A layer may import only layers before it.
LAYERS = (
    "bundled_rules",  # passes/, the rule files (installed as fxpeft.bundled_rules; no code)
    "names", "errors", "registry",  # root leaves: shared names, exceptions, the kind registry
    "rules",        # rule files as validated data
    "graph",        # building blocks of an adapted graph: targets, params, gates, dropout, records
    "capture",      # model -> Program (export, linear-site index, replicate, caches, quantized ops)
    "match",        # the pure query, explain, attention / embedding / conv / input sites
    "formats",      # HF PEFT's keys and config fields, which kinds speak
    "kinds",        # one file per adapter kind
    "runtime",      # AdaptedModule, emit, the kinds' passes and their manager, rewrite
    "transforms",   # optional passes on an emitted copy: fuse, merge
    "io",           # save / load, folders
    "generation",   # the decode graph and generate
    "api",          # the public face
    "helpers",      # real models, data and memory for examples, benchmarks and the CLI
    "tools",        # cli, convert, trainer, plots
    "fxpeft",       # the root package
)


def layer_of(module: str) -> str:
    """``fxpeft.capture.export`` -> ``capture``; ``fxpeft.names`` -> ``names``; ``fxpeft`` itself
    -> ``fxpeft``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def layer_graph() -> nx.DiGraph:
    layers = nx.DiGraph()
    for importer, imported in import_graph().edges:
        if layer_of(importer) != layer_of(imported):
            layers.add_edge(layer_of(importer), layer_of(imported), example=(importer, imported))
    return layers


def upward_imports(layers: nx.DiGraph) -> list[str]:
    rank = {name: index for index, name in enumerate(LAYERS)}
    return [f"{a} -> {b} ({data['example'][0]} imports {data['example'][1]})"
            for a, b, data in layers.edges(data=True) if rank[b] > rank[a]]


def test_every_module_is_in_a_declared_layer():
    found = {layer_of(m) for m in import_graph().nodes}
    assert found - set(LAYERS) == set()
    assert {"capture", "match", "kinds", "runtime", "transforms", "io"} <= found


def test_imports_point_only_down_the_layers():
    layers = layer_graph()
    assert layers.number_of_edges() > 20  # the scan sees the real imports
    assert ("transforms", "runtime") in layers.edges and ("kinds", "match") in layers.edges
    assert upward_imports(layers) == []


def test_the_layer_graph_has_no_cycle():
    assert list(nx.simple_cycles(layer_graph())) == []


def test_no_engine_layer_imports_the_helpers():
    engine = set(LAYERS[:LAYERS.index("api") + 1])
    users = {a for a, b in layer_graph().edges if b == "helpers"}
    assert users & engine == set()


def test_pyproject_lists_every_package():
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    folders = {".".join(("fxpeft", *p.parent.relative_to(PACKAGE).parts)).rstrip(".")
               for p in PACKAGE.rglob("__init__.py")}
    assert folders - listed == set()
    assert listed - folders <= {"fxpeft.bundled_rules"}  # in the checkout it is passes/
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} == {
        f.split(".")[1] for f in folders if "." in f}  # no folder without an __init__
    assert set(config["tool"]["setuptools"]["package-data"]) == {"fxpeft.bundled_rules"}


def test_the_root_keeps_only_the_face_and_the_leaves():
    modules = sorted(p.stem for p in Path(PACKAGE).glob("*.py"))
    assert modules == ["__init__", "api", "errors", "names", "registry"]
