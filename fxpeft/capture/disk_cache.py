"""An on-disk capture cache: ``rewrite`` in a new process skips ``torch.export`` when a model of
the same class, config, structure, input signature and versions was captured before.

A file holds one captured graph as JSON, never weights and never a pickle: each node's op, its
target (an ATen operator resolved by name under ``torch.ops.aten`` / ``torch.ops.prims``, or one
of a short list of ``operator`` and ``torch.sym_*`` functions; anything else is refused), its
arguments (other nodes by name, numbers, strings, dtypes, devices), and the metadata later passes
read: ``val`` (shapes as expressions over named size symbols, rebuilt as fake tensors in a fresh
shape environment), ``nn_module_stack``, ``stack_trace``, ``torch_fn``; the graph's input and
output tree specs in pytree's own JSON; and ``CaptureInfo``'s plain fields. A graph with anything
else (lifted constants, submodules, other callables) is not written.

Files live in ``$FXPEFT_CAPTURE_CACHE_DIR``, by default ``~/.cache/fxpeft/capture`` (under
``$FXPEFT_CACHE``), one per key, named by a hash of the key; the file holds the whole key (with
fxpeft's capture code hashed into it), which a read compares, so a hash collision is a miss.
``FXPEFT_CAPTURE_CACHE=0`` turns this and the in-process cache off; ``FXPEFT_CAPTURE_CACHE=memory``
keeps only the in-process one. Writes go to a temporary file renamed into place; a file that is
unreadable, truncated, for another key or names anything outside the lists is ignored (logged),
and the fresh capture then replaces it. No error here ever fails a ``rewrite``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import operator
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Hashable

import torch
import torch.fx

from fxpeft.capture.program import CaptureInfo
from fxpeft.names import cache_root

log = logging.getLogger("fxpeft")

FORMAT = 1
_META_STRINGS = ("stack_trace",)
# Python callables a graph may call besides ATen/prims operators, by the name the file uses.
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    **{f"operator.{name}": getattr(operator, name) for name in (
        "getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "pow", "neg", "eq", "ne",
        "lt", "le", "gt", "ge", "and_", "or_", "not_")},
    **{f"torch.{name}": getattr(torch, name) for name in (
        "sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sum")
       if hasattr(torch, name)},
    "math.ceil": math.ceil, "math.floor": math.floor, "math.sqrt": math.sqrt,
}
_FUNCTION_NAMES = {id(f): name for name, f in _FUNCTIONS.items()}
_OP_NAMESPACES = ("aten", "prims")
_DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}
_MEMORY_FORMATS = {str(f).removeprefix("torch."): f for f in (
    torch.contiguous_format, torch.channels_last, torch.preserve_format, torch.channels_last_3d)}
_LAYOUTS = {str(f).removeprefix("torch."): f for f in (torch.strided, torch.sparse_coo)}


class Unstorable(Exception):
    """The graph holds something the file format does not describe; it is not written."""


class BadFile(Exception):
    """A file that does not describe a graph this format can rebuild; it is ignored."""


def enabled() -> bool:
    """Whether captures are kept on disk (``FXPEFT_CAPTURE_CACHE`` not ``0`` or ``memory``).

    >>> isinstance(enabled(), bool)
    True
    """
    return os.environ.get("FXPEFT_CAPTURE_CACHE", "1") not in ("0", "memory")


def folder() -> Path:
    """``$FXPEFT_CAPTURE_CACHE_DIR``, or ``capture`` in fxpeft's cache folder.

    >>> folder().name != ""
    True
    """
    return Path(os.environ.get("FXPEFT_CAPTURE_CACHE_DIR") or cache_root() / "capture")


@functools.cache
def code_version() -> str:
    """A hash of fxpeft's capture code: a graph captured by other code is another key.

    >>> len(code_version())
    16
    """
    digest = hashlib.sha256(str(FORMAT).encode())
    for source in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def key_text(key: Hashable) -> str:
    """The cache key as the text a file stores (its ``repr``, which names dtypes and types).

    >>> key_text(("a", 1)).endswith("('a', 1)")
    True
    """
    return f"fxpeft capture {code_version()} {key!r}"


def path_of(text: str) -> Path:
    """The file for a key's text: its SHA-256 names it.

    >>> path_of("k").suffix
    '.json'
    """
    return folder() / f"{hashlib.sha256(text.encode()).hexdigest()[:40]}.json"


# ----- writing -----------------------------------------------------------------------------

def save(key: Hashable, graph: torch.fx.Graph, info: CaptureInfo) -> bool:
    """Write ``graph`` and ``info`` for ``key``; False (logged) where it cannot be stored."""
    text = key_text(key)
    try:
        data = json.dumps({"format": FORMAT, "key": text, **encode_graph(graph), "info": _info(info)},
                          separators=(",", ":"))
        _write_atomic(path_of(text), data)
    except (Unstorable, OSError, ValueError, TypeError) as why:
        log.debug("capture disk cache: not written: %s", why)
        return False
    return True


def _write_atomic(path: Path, data: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(handle, "w") as out:
            out.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _info(info: CaptureInfo) -> dict[str, Any]:
    return {"model_class": info.model_class, "frontend": info.frontend, "inputs": list(info.inputs),
            "out_spec": _spec(info.out_spec), "max_seq": info.max_seq, "positions": info.positions,
            "packs": info.packs}


def _spec(spec: Any) -> str | None:
    if spec is None:
        return None
    try:
        return torch.utils._pytree.treespec_dumps(spec)
    except Exception as why:  # pytree refuses a type registered without a serialized name
        raise Unstorable(f"tree spec {spec}: {why}") from None


def encode_graph(graph: torch.fx.Graph) -> dict[str, Any]:
    """``graph`` as plain data (``Unstorable`` where it holds what the format cannot say).

    >>> g = torch.fx.Graph(); x = g.placeholder("x")
    >>> _ = g.output(g.call_function(torch.ops.aten.neg.default, (x,)))
    >>> [n["target"] for n in encode_graph(g)["nodes"]]
    ['x', 'aten.neg.default', 'output']
    """
    symbols: dict[str, list[Any]] = {}
    strings: dict[str, int] = {}  # stack traces and module paths repeat: each is kept once
    nodes = [_node(n, symbols, strings) for n in graph.nodes]
    codegen = graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if type(codegen) is not torch.fx.graph.CodeGen and info is None:
        raise Unstorable(f"code generator {type(codegen).__name__}")
    tree = None if info is None else {"orig_args": list(info.orig_args), "in_spec": _spec(info.in_spec),
                                      "out_spec": _spec(info.out_spec)}
    return {"nodes": nodes, "symbols": symbols, "strings": list(strings), "pytree": tree}


def _node(node: torch.fx.Node, symbols: dict[str, list[Any]], strings: dict[str, int]) -> dict[str, Any]:
    def text(value: str) -> int:
        return strings.setdefault(value, len(strings))

    if node.op not in ("placeholder", "get_attr", "call_function", "output"):
        raise Unstorable(f"{node.op} node {node.name}")
    target = _target_name(node.target) if node.op == "call_function" else node.target
    meta: dict[str, Any] = {key: text(node.meta[key]) for key in _META_STRINGS
                            if isinstance(node.meta.get(key), str)}
    if "val" in node.meta:
        meta["val"] = _value(node.meta["val"], symbols)
    stack = node.meta.get("nn_module_stack")
    if stack:
        meta["nn_module_stack"] = [[text(k), text(path), text(kind if isinstance(kind, str) else
                                                         f"{kind.__module__}.{kind.__qualname__}")]
                                   for k, (path, kind) in stack.items()]
    if isinstance(node.meta.get("torch_fn"), tuple):
        meta["torch_fn"] = list(node.meta["torch_fn"])
    return {"name": node.name, "op": node.op, "target": target, "args": _value(node.args, symbols),
            "kwargs": _value(node.kwargs, symbols), "meta": meta}


def _target_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload) and target.namespace in _OP_NAMESPACES:
        return f"{target.namespace}.{target._opname}.{target._overloadname}"
    name = _FUNCTION_NAMES.get(id(target))
    if name is None:
        raise Unstorable(f"target {target!r}")
    return name


def _value(value: Any, symbols: dict[str, list[Any]]) -> Any:
    """Arguments and ``val`` metadata as JSON: a list is a list, anything else a tagged object."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, torch.fx.Node):
        return {"node": value.name}
    if isinstance(value, (list, tuple)):
        items = [_value(v, symbols) for v in value]
        return items if isinstance(value, list) else {"tuple": items}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise Unstorable("a dict with keys that are not strings")
        return {"dict": {k: _value(v, symbols) for k, v in value.items()}}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, torch.SymInt):
        return {"symint": _expr(value, symbols)}
    if isinstance(value, torch._subclasses.FakeTensor):
        return {"tensor": [[_size(s, symbols) for s in value.shape],
                           [_size(s, symbols) for s in value.stride()],
                           str(value.dtype).removeprefix("torch."), str(value.device),
                           value.requires_grad]}
    raise Unstorable(f"a value of type {type(value).__name__}")


def _size(size: Any, symbols: dict[str, list[Any]]) -> Any:
    return _expr(size, symbols) if isinstance(size, torch.SymInt) else int(size)


def _expr(size: torch.SymInt, symbols: dict[str, list[Any]]) -> Any:
    node = size.node
    data, free = _expr_parts(node.expr)
    _note_symbols(free, node.shape_env, symbols)
    return data


@functools.lru_cache(maxsize=4096)
def _expr_parts(expr: Any) -> tuple[Any, tuple[Any, ...]]:
    """A size expression's data and its symbols: a graph has thousands of sizes but a few dozen
    expressions, and sympy's ``free_symbols`` was half the time of writing a file."""
    return _sympy(expr), tuple(expr.free_symbols)


def _note_symbols(free: tuple[Any, ...], shape_env: Any, symbols: dict[str, list[Any]]) -> None:
    for symbol in free:
        name = str(symbol)
        if name not in symbols:
            hints = getattr(shape_env, "backed_var_to_val", None)  # torch 2.13; var_to_val before
            hint = (hints if hints is not None else shape_env.var_to_val).get(symbol)
            bounds = shape_env.var_to_range.get(symbol)
            if hint is None or bounds is None:
                raise Unstorable(f"size symbol {name} without a hint")
            symbols[name] = [int(hint), _bound(bounds.lower), _bound(bounds.upper)]


def _bound(value: Any) -> int | None:
    return int(value) if getattr(value, "is_Integer", False) else None


_SYMPY_NAMES = ("Add", "Mul", "Pow", "Max", "Min", "FloorDiv", "CleanDiv", "ModularIndexing",
                "PythonMod", "Mod", "CeilDiv", "IntTrueDiv")


def _sympy(expr: Any) -> Any:
    """A size expression as nested lists: an int, a symbol's name, or [function, *arguments]."""
    if expr.is_Integer:
        return int(expr)
    if expr.is_Symbol:
        return str(expr)
    name = type(expr).__name__
    if name not in _SYMPY_NAMES:
        raise Unstorable(f"size expression {expr}")
    return [name, *(_sympy(a) for a in expr.args)]


# ----- reading -----------------------------------------------------------------------------

def load(key: Hashable) -> tuple[torch.fx.Graph, CaptureInfo] | None:
    """The graph and info stored for ``key``, or None: missing, or ignored (logged) as unusable."""
    text = key_text(key)
    path = path_of(text)
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    try:
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("key") != text:
            raise BadFile("written for another key or format")
        graph = decode_graph(data)
        info = _read_info(data["info"])
    except Exception as why:  # a file is data from disk: nothing in it may fail a rewrite
        log.warning("fxpeft: ignoring the capture cache file %s (%s: %s); capturing afresh",
                    path, type(why).__name__, str(why)[:200])
        return None
    log.debug("capture: read from the capture cache file %s", path)
    return graph, info


def _read_info(data: dict[str, Any]) -> CaptureInfo:
    out_spec = _read_spec(data["out_spec"])
    return CaptureInfo(str(data["model_class"]), str(data["frontend"]),
                       tuple(str(i) for i in data["inputs"]), None, out_spec,
                       _optional_int(data["max_seq"]), False, None,
                       None if data["positions"] is None else str(data["positions"]),
                       bool(data["packs"]))


def _optional_int(value: Any) -> int | None:
    if value is not None and type(value) is not int:
        raise BadFile(f"{value!r} is not an int")
    return value


def _read_spec(text: Any) -> Any:
    if text is None:
        return None
    if not isinstance(text, str):
        raise BadFile("a tree spec that is not text")
    return torch.utils._pytree.treespec_loads(text)  # JSON, types looked up in pytree's registry


class _Reader:
    """Rebuilds node arguments and ``val`` metadata; sizes become symbols of one shape env."""

    def __init__(self, symbols: dict[str, Any], strings: list[Any]) -> None:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import ShapeEnv
        self.shape_env = ShapeEnv()
        self.fake_mode = FakeTensorMode(shape_env=self.shape_env)
        self.nodes: dict[str, torch.fx.Node] = {}
        self.strings = [str(t) for t in strings]
        self.symbols = {name: self._symbol(name, entry) for name, entry in symbols.items()}
        self.hints = {self.symbols[name]: int(entry[0]) for name, entry in symbols.items()}
        self.sizes: dict[str, Any] = {}
        # Nodes with one shape, stride, dtype and device share one fake tensor: making one costs
        # a millisecond, and a 30-layer model has thousands of nodes but a few dozen kinds.
        self.tensors: dict[str, torch.Tensor] = {}

    def _symbol(self, name: str, entry: Any) -> Any:
        import sympy
        if not (isinstance(name, str) and name.isidentifier() and isinstance(entry, list)
                and len(entry) == 3 and all(e is None or type(e) is int for e in entry)):
            raise BadFile(f"size symbol {name!r}")
        symbol = sympy.Symbol(name, integer=True, positive=True)
        add = getattr(self.shape_env, "add_backed_var_to_val", None)
        if add is not None:
            add(symbol, entry[0])
        else:  # torch before 2.13
            self.shape_env.var_to_val[symbol] = sympy.Integer(entry[0])
        low, high = entry[1], entry[2]
        _set_range(self.shape_env, symbol, low if low is not None else 0,
                   high if high is not None else int(2**63 - 1))
        return symbol

    def expr(self, data: Any) -> Any:
        import sympy
        if type(data) is int:
            return sympy.Integer(data)
        if isinstance(data, str):
            if data not in self.symbols:
                raise BadFile(f"unknown size symbol {data!r}")
            return self.symbols[data]
        if not (isinstance(data, list) and data and data[0] in _SYMPY_NAMES):
            raise BadFile(f"size expression {data!r}")
        return _sympy_function(data[0])(*(self.expr(a) for a in data[1:]))

    def size(self, data: Any) -> Any:
        if type(data) is int:
            return data
        text = json.dumps(data)
        if text not in self.sizes:
            expr = self.expr(data)
            hint = int(expr.xreplace(self.hints))
            self.sizes[text] = self.shape_env.create_symintnode(expr, hint=hint)
        return self.sizes[text]

    def value(self, data: Any) -> Any:
        if data is None or isinstance(data, (bool, int, float, str)):
            return data
        if isinstance(data, list):
            return [self.value(v) for v in data]
        if not (isinstance(data, dict) and len(data) == 1):
            raise BadFile(f"value {str(data)[:80]}")
        (tag, body), = data.items()
        return self._tagged(tag, body)

    def _tagged(self, tag: str, body: Any) -> Any:
        if tag == "node":
            if body not in self.nodes:
                raise BadFile(f"a reference to {body!r}, not an earlier node")
            return self.nodes[body]
        if tag == "tuple":
            return tuple(self.value(v) for v in _list(body))
        if tag == "dict":
            if not isinstance(body, dict):
                raise BadFile("dict")
            return {str(k): self.value(v) for k, v in body.items()}
        if tag == "float" and body in ("inf", "-inf", "nan"):
            return float(body)
        if tag in ("dtype", "memory_format", "layout"):
            table = {"dtype": _DTYPES, "memory_format": _MEMORY_FORMATS, "layout": _LAYOUTS}[tag]
            if body not in table:
                raise BadFile(f"{tag} {body!r}")
            return table[body]
        if tag == "device":
            return torch.device(str(body))
        if tag == "symint":
            return self.size(body)
        if tag == "tensor":
            return self.tensor(body)
        raise BadFile(f"unknown tag {tag!r}")

    def tensor(self, body: Any) -> torch.Tensor:
        text = json.dumps(body)
        if text not in self.tensors:
            self.tensors[text] = self._fake_tensor(body)
        return self.tensors[text]

    def _fake_tensor(self, body: Any) -> torch.Tensor:
        shape, stride, dtype, device, requires_grad = _list(body)
        if dtype not in _DTYPES:
            raise BadFile(f"dtype {dtype!r}")
        sizes, strides = [self.size(s) for s in _list(shape)], [self.size(s) for s in _list(stride)]
        device = torch.device(str(device))
        # A meta tensor wrapped as the fake tensor the mode's dispatch would make: the dispatch
        # (its output cache, stride checks over symbols) took ten times as long per tensor.
        elem = torch.empty_strided(sizes, strides, dtype=_DTYPES[dtype], device="meta",
                                   requires_grad=bool(requires_grad))
        return _as_fake(self.fake_mode, elem, device)


def _set_range(shape_env: Any, symbol: Any, low: int, high: int) -> None:
    """``constrain_symbol_range`` with a fixed source location: the public call looks up the
    caller's frame, whose first use imports ``torch.export``'s tracer and AOTAutograd (0.3-0.7 s
    of a new process's ``rewrite`` from the cache, which never exports)."""
    from torch._guards import SLoc
    from torch.fx.experimental.symbolic_shapes import ValueRangesSLoc
    from torch.utils._sympy.value_ranges import ValueRanges
    where = SLoc("fxpeft capture cache file", None)
    try:
        shape_env._update_var_to_range(symbol, ValueRanges(low, high), ValueRangesSLoc(where, where))
    except (AttributeError, TypeError):  # a torch without it: the public call
        shape_env.constrain_symbol_range(symbol, low, high)


def _as_fake(mode: Any, elem: torch.Tensor, device: torch.device) -> torch.Tensor:
    from torch._subclasses.fake_tensor import FakeTensor
    return FakeTensor(mode, elem, device)


def _list(body: Any) -> list[Any]:
    if not isinstance(body, list):
        raise BadFile(f"{str(body)[:80]} is not a list")
    return body


@functools.cache
def _sympy_function(name: str) -> Any:
    import sympy
    from torch.utils._sympy import functions
    return getattr(sympy, name, None) if name in ("Add", "Mul", "Pow") else getattr(functions, name)


def resolve_target(name: Any) -> Callable[..., Any]:
    """The callable a file's target names: an ATen or prims operator overload, or one of
    ``_FUNCTIONS``; anything else is a ``BadFile``.

    >>> resolve_target("aten.neg.default") is torch.ops.aten.neg.default
    True
    >>> resolve_target("os.system")
    Traceback (most recent call last):
    fxpeft.capture.disk_cache.BadFile: target 'os.system' is not an allowed operator
    """
    if isinstance(name, str) and name in _FUNCTIONS:
        return _FUNCTIONS[name]
    parts = name.split(".") if isinstance(name, str) else []
    if len(parts) == 3 and parts[0] in _OP_NAMESPACES and all(p.isidentifier() for p in parts):
        try:
            found = getattr(getattr(getattr(torch.ops, parts[0]), parts[1]), parts[2])
        except (AttributeError, RuntimeError):
            found = None
        if isinstance(found, torch._ops.OpOverload):
            return found
    raise BadFile(f"target {name!r} is not an allowed operator")


def _attribute_path(target: Any) -> str:
    if not (isinstance(target, str) and target
            and all(p.isidentifier() or p.isdigit() for p in target.split("."))):
        raise BadFile(f"attribute {target!r}")
    return target


def decode_graph(data: dict[str, Any]) -> torch.fx.Graph:
    """The graph ``encode_graph`` described (``BadFile`` where the data is not such a graph).

    >>> g = torch.fx.Graph(); x = g.placeholder("x")
    >>> _ = g.output(g.call_function(torch.ops.aten.neg.default, (x,)))
    >>> [n.target for n in decode_graph(encode_graph(g)).nodes][1]
    <OpOverload(op='aten.neg', overload='default')>
    """
    reader = _Reader(data["symbols"] if isinstance(data.get("symbols"), dict) else {},
                     _list(data.get("strings", [])))
    graph = torch.fx.Graph()
    tree = data.get("pytree")
    if tree is not None:
        graph._codegen = torch.fx.graph._PyTreeCodeGen(torch.fx.graph._PyTreeInfo(
            [str(a) for a in _list(tree["orig_args"])], _read_spec(tree["in_spec"]),
            _read_spec(tree["out_spec"])))
    for entry in _list(data["nodes"]):
        graph_node = _add_node(graph, entry, reader)
        reader.nodes[entry["name"]] = graph_node
    graph.lint()
    return graph


def _add_node(graph: torch.fx.Graph, entry: dict[str, Any], reader: _Reader) -> torch.fx.Node:
    op = entry["op"]
    if op == "call_function":
        target: Any = resolve_target(entry["target"])
    elif op in ("placeholder", "get_attr"):
        target = _attribute_path(entry["target"])
    elif op == "output":
        target = "output"
    else:
        raise BadFile(f"node op {op!r}")
    args, kwargs = reader.value(entry["args"]), reader.value(entry["kwargs"])
    if not (isinstance(args, tuple) and isinstance(kwargs, dict)):
        raise BadFile("node arguments")
    name = entry["name"]
    if not (isinstance(name, str) and name.isidentifier()):
        raise BadFile(f"node name {name!r}")
    node = graph.create_node(op, target, args, kwargs, name=name)
    if node.name != name:
        raise BadFile(f"node name {name!r} given twice")
    _read_meta(node, entry.get("meta") or {}, reader)
    return node


def _read_meta(node: torch.fx.Node, meta: dict[str, Any], reader: _Reader) -> None:
    text = reader.strings.__getitem__  # an index outside the table is an IndexError: ignored
    for key in _META_STRINGS:
        if key in meta:
            node.meta[key] = text(meta[key])
    if "val" in meta:
        node.meta["val"] = reader.value(meta["val"])
    if "nn_module_stack" in meta:
        node.meta["nn_module_stack"] = {text(k): (text(path), text(kind))
                                        for k, path, kind in _list(meta["nn_module_stack"])}
    if "torch_fn" in meta:
        node.meta["torch_fn"] = tuple(str(part) for part in _list(meta["torch_fn"]))
