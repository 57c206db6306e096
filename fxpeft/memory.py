"""Process memory for benchmarks and examples: resident set size now, and its peak since the
last reset (Linux ``/proc``), in MiB.

>>> current_rss_mib() > 0
True
"""

from __future__ import annotations

from pathlib import Path


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
