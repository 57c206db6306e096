"""A warm-start cache for ``torch.compile`` of fxpeft graphs, kept in fxpeft's own cache folder.

Inductor caches what it compiles (generated code, FX graphs, AOTAutograd graphs and, on CPU, the
C++ kernels it builds with g++) in ``$TORCHINDUCTOR_CACHE_DIR``, by default a folder in ``/tmp``.
That folder is empty in a new container, after a reboot, or where a job sets a fresh one, and a
first compiled step then spends most of its time compiling C++. fxpeft keeps a copy of what
inductor wrote while fxpeft graphs were compiled, in ``$FXPEFT_COMPILE_CACHE`` (default
``~/.cache/fxpeft/compile``), and copies it back into an empty inductor folder when a compile
starts. Inductor still decides every hit by its own keys (source and flags for a kernel; graph,
config and versions for a graph), so a copy that does not fit is simply not used.

The copies sit under a key of the torch and Python versions, the CPU's instruction-set flags and
the C++ compiler, because inductor's CPU kernels are built for the CPU they were compiled on
(``-march=native``). Lock files are never copied, and a shared library is copied only when its
ELF header says it is whole (g++ writes it in place; another process may still be writing one).
Only processes that built an fxpeft graph register the two compile callbacks, and they keep only
what compiles of fxpeft graphs write: a compile counts as fxpeft's when the frame Dynamo compiles
holds an fxpeft graph (``torch.compile(gm)``, ``gm.compile()``, a function given the graph as an
argument or closing over it); what inductor writes from its start until a compile of anything else
starts (a lazily compiled backward included) is kept, and nothing else: a user's own
``torch.compile`` of other code in the same process is left alone. A torch whose Dynamo frames
look otherwise keeps nothing (the cache is off, never wrong). ``FXPEFT_COMPILE_CACHE=0`` turns
it off; the folder is
held to ``FXPEFT_COMPILE_CACHE_MB`` (default 512) by dropping its oldest files. Any failure here is
logged at debug level and never fails a compile.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import logging
import os
import platform
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

import torch

from fxpeft.names import cache_root

log = logging.getLogger("fxpeft")

SKIPPED_PARTS = frozenset({"locks", "precompiled_headers"})
_started: dict[str, float] = {}  # inductor folder -> when this process first restored into it
# inductor folder -> [start, end] windows in which fxpeft graphs compiled (end inf: still open)
_windows: dict[str, list[list[float]]] = {}
_exit_hook: list = []


def enabled() -> bool:
    """Whether the warm-start cache is on (``FXPEFT_COMPILE_CACHE=0`` turns it off).

    >>> isinstance(enabled(), bool)
    True
    """
    return os.environ.get("FXPEFT_COMPILE_CACHE", "") != "0"


def store_folder() -> Path:
    """The folder for this machine and these versions, inside ``$FXPEFT_COMPILE_CACHE``.

    >>> store_folder().parent.name != ""
    True
    """
    root = os.environ.get("FXPEFT_COMPILE_CACHE") or str(cache_root() / "compile")
    return Path(root) / environment_key()


@functools.cache
def environment_key() -> str:
    """What a compiled kernel depends on beyond inductor's own keys, hashed.

    >>> len(environment_key())
    16
    """
    parts = (torch.__version__, sys.version, platform.machine(), _cpu_flags(), _compiler())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _compiler() -> str:
    try:
        from torch._inductor.cpp_builder import get_compiler_version_info, get_cpp_compiler
        return get_compiler_version_info(get_cpp_compiler())
    except Exception:  # no C++ compiler, or torch moved these helpers: the versions still key it
        return ""


def activate() -> None:
    """Register the compile callbacks, once (every new fxpeft graph and ``fxpeft.fuse`` call this;
    ``torch._dynamo.reset()`` drops them until the next one).

    >>> activate()
    """
    handler = getattr(torch._dynamo, "callback_handler", None)
    if (not enabled() or handler is None
            or _on_compile_start in getattr(handler, "start_callbacks", ())):
        return
    try:
        handler.register_start_callback(_on_compile_start)
        handler.register_end_callback(_on_compile_end)
    except Exception as error:  # another torch's callback API: compile without the cache
        log.debug("compile cache: not registered: %s", error)
        return
    if not _exit_hook:  # what compile workers finish after the last compile ends, kept at exit
        _exit_hook.append(atexit.register(_on_exit))


def _inductor_folder() -> Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    return Path(cache_dir())


def _is_fxpeft_graph(value: object) -> bool:
    return isinstance(value, torch.nn.Module) and getattr(value, "capture_info", None) is not None


def compiling_fxpeft_graph() -> bool:
    """Whether the frame Dynamo is compiling now holds an fxpeft graph: among its locals (a
    module's own frame holds it as ``fn`` or ``self``) or its closure. Read from Dynamo's
    ``_compile`` frame, whose ``locals`` and ``closure`` are the compiled frame's.

    >>> compiling_fxpeft_graph()  # not inside a compile
    False
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_compile" and "locals" in frame.f_locals:
            values = list((frame.f_locals.get("locals") or {}).values())
            cells = frame.f_locals.get("closure") or ()
            values += [getattr(cell, "cell_contents", None) for cell in cells]
            return any(_is_fxpeft_graph(value) for value in values)
        frame = frame.f_back
    return False


def _continues_a_compile(args: tuple) -> bool:
    """A start that Dynamo did not trigger (a lazily compiled backward, autotuning, CUDA graph
    recording) belongs to the frame compiled before it."""
    trigger = getattr(args[0], "callback_trigger", None) if args else None
    return trigger is not None and getattr(trigger, "name", "") != "DYNAMO"


def _on_compile_start(*args: object) -> None:
    if not enabled():
        return
    try:
        folder, now = str(_inductor_folder()), time.time()
        windows = _windows.setdefault(folder, [])
        if _continues_a_compile(args):
            return
        if not compiling_fxpeft_graph():  # another compile: what it writes is not ours
            if windows and windows[-1][1] == float("inf"):
                windows[-1][1] = now
            return
        if not windows or windows[-1][1] != float("inf"):  # 2 s back: whole-second file systems
            windows.append([now - 2.0, float("inf")])
        if folder not in _started:
            _started[folder] = now - 2.0
            store = store_folder()
            log.debug("compile cache: %d files from %s into %s", restore(store, Path(folder)),
                      store, folder)
    except Exception as error:  # a cache must never fail a compile
        log.debug("compile cache: restore skipped: %s", error)


def _harvest_windows(folder: str) -> int:
    return sum(harvest(Path(folder), store_folder(), since=start, until=end)
               for start, end in _windows.get(folder, ()))


def _on_compile_end(*_args: object) -> None:
    if not enabled():
        return
    try:
        folder = str(_inductor_folder())
        if folder not in _started:  # a folder no fxpeft compile started in: not ours to copy
            return
        log.debug("compile cache: kept %d new files from %s", _harvest_windows(folder), folder)
    except Exception as error:
        log.debug("compile cache: harvest skipped: %s", error)


def _on_exit() -> None:
    for folder in list(_started) if enabled() else ():
        try:
            _harvest_windows(folder)
        except Exception as error:
            log.debug("compile cache: harvest at exit skipped: %s", error)


def _cacheable(relative: Path) -> bool:
    name = relative.name
    return (not SKIPPED_PARTS.intersection(relative.parts) and not name.endswith(".lock")
            and not name.startswith(".") and ".tmp" not in name)


def _files(folder: Path) -> dict[Path, os.stat_result]:
    found = {}
    for directory, _dirs, names in os.walk(folder):
        for name in names:
            path = Path(directory, name)
            relative = path.relative_to(folder)
            if _cacheable(relative):
                try:
                    found[relative] = path.stat()
                except OSError:  # removed while we walked
                    continue
    return found


def restore(store: Path, inductor: Path) -> int:
    """Copy what ``store`` holds into the inductor folder where it is missing; returns the count.

    >>> restore(Path("/nonexistent"), Path(tempfile.gettempdir()))
    0
    """
    if not store.is_dir():
        return 0
    copied = 0
    for relative in _files(store):
        target = inductor / relative
        if not target.exists():
            _copy(store / relative, target)
            copied += 1
    return copied


def harvest(inductor: Path, store: Path, since: float = 0.0, until: float = float("inf")) -> int:
    """Copy into ``store`` the files inductor wrote from ``since`` to ``until`` that it lacks;
    returns the count.

    >>> harvest(Path("/nonexistent"), Path(tempfile.gettempdir()) / "fxpeft-doctest-store")
    0
    """
    if not inductor.is_dir():
        return 0
    kept = 0
    for relative, stat in _files(inductor).items():
        source, target = inductor / relative, store / relative
        if since <= stat.st_mtime <= until and not target.exists() and _whole(source):
            _copy(source, target)
            kept += 1
    if kept:
        _hold_to_limit(store)
    return kept


def _whole(path: Path) -> bool:
    """A shared library is whole when its section table ends inside the file (ELF64 only)."""
    if path.suffix != ".so":
        return True  # inductor writes code and cache entries atomically
    try:
        with open(path, "rb") as library:
            header = library.read(64)
        size = path.stat().st_size
    except OSError:
        return False
    if len(header) < 64 or header[:5] != b"\x7fELF\x02":
        return False
    order = "<" if header[5] == 1 else ">"
    section_offset, = struct.unpack_from(order + "Q", header, 0x28)
    entry_size, count = struct.unpack_from(order + "HH", header, 0x3A)
    return 0 < section_offset + entry_size * count <= size


def _copy(source: Path, target: Path) -> None:
    """Copy atomically (a temporary file beside the target, then a rename), keeping the mtime."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=".fxpeft-", suffix=".tmp")
    os.close(handle)
    try:
        shutil.copy2(source, temporary)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _hold_to_limit(store: Path) -> None:
    limit = float(os.environ.get("FXPEFT_COMPILE_CACHE_MB", "512")) * 2**20
    files = sorted(_files(store).items(), key=lambda item: item[1].st_mtime)
    total = sum(stat.st_size for _, stat in files)
    for relative, stat in files:
        if total <= limit:
            break
        (store / relative).unlink(missing_ok=True)
        total -= stat.st_size
