"""Process memory for benchmarks and examples: resident set size now, and its peak since the
last reset (Linux ``/proc``), in MiB.

>>> current_rss_mib() > 0
True
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections import defaultdict
from pathlib import Path

import torch

# glibc raises its mmap threshold after each large free, after which freed tensors stay in the
# heap and RSS records the heap's high-water mark instead of live memory. A fixed threshold
# (set before the process starts) keeps large tensors mmapped, so RSS follows them.
STEADY_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024  # kB
    raise OSError(f"no {field} in /proc/self/status (Linux only)")


def current_rss_mib() -> float:
    """The process's resident set size now."""
    return _status_mib("VmRSS")


def peak_rss_mib() -> float:
    """The highest resident set size since start or the last ``reset_peak_rss``."""
    return _status_mib("VmHWM")


def reset_peak_rss() -> None:
    """Make the peak the current RSS, so a later ``peak_rss_mib`` covers only what follows."""
    Path("/proc/self/clear_refs").write_text("5")


def release_freed_memory() -> None:
    """Return freed heap memory to the OS (glibc ``malloc_trim``), so RSS measures what is live;
    a no-op where there is no glibc."""
    libc = ctypes.util.find_library("c")
    if libc:
        trim = getattr(ctypes.CDLL(libc), "malloc_trim", None)
        if trim is not None:
            trim(0)


def own_memory(model: torch.nn.Module) -> None:
    """Give every parameter and buffer of ``model`` memory of its own. ``from_pretrained`` maps
    the checkpoint file and loads weights as views of it; quantizing on load reads every page of
    that mapping, which then stays resident (counted in RSS) for as long as any view, such as an
    unquantized embedding, keeps it mapped. Copies let it go, so RSS counts what the model holds.

    >>> import torch
    >>> net = torch.nn.Linear(2, 2); own_memory(net); net.weight.shape
    torch.Size([2, 2])
    """
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()
    gc.collect()
    release_freed_memory()


class SavedTensors:
    """Counts the bytes autograd saves while it is active, once per storage, by label.

    >>> x = torch.randn(4, 8, requires_grad=True)
    >>> with SavedTensors() as saved:
    ...     y = (x * x).sum()
    >>> saved.total(), dict(saved.by_label)  # x kept once, though ``mul`` saves it twice
    (128, {('?', (4, 8)): 128})
    """

    def __init__(self, exclude: "list[torch.Tensor] | None" = None) -> None:
        self.by_label: dict[tuple[str, tuple], int] = defaultdict(int)
        self.label = "?"
        self._seen: set[int] = {t.untyped_storage().data_ptr() for t in exclude or []}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._seen and storage.device.type != "meta":
            self._seen.add(storage.data_ptr())
            self.by_label[(self.label, tuple(tensor.shape))] += storage.nbytes()
        return tensor

    def total(self) -> int:
        return sum(self.by_label.values())

    def __enter__(self) -> "SavedTensors":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)
