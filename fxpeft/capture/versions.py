"""The versions of torch, transformers and bitsandbytes fxpeft is tested with, checked at capture
(so at ``fxpeft.rewrite`` and ``fxpeft.load``): a version outside them is a ``VersionError``
naming it and the range, never a graph that may be silently wrong. pyproject.toml declares the
same ranges (``tests/structure/test_versions.py`` holds them equal).

Where the ranges come from: CI runs the suite at the top (pinned by the test extra) and a shorter
leg at the bottom of the transformers range. transformers 5.17 (the GPU machine's) does not
capture OPT (a data-dependent guard in its position embedding) and lacks the static cache's
``get_head_shapes``, so the bottom is 5.23 and GPU runs bring a transformers wheel. torch's bottom is the GPU machine's own 2.11 (its
runs are in docs/gpus.md), since 2.13 is the only CPU build of torch the registry gives here.
``FXPEFT_UNTESTED_VERSIONS=1`` turns the error into a warning, for trying a newer release.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import warnings

from packaging.version import Version

from fxpeft.errors import FxpeftError

# package -> (lowest tested, first version above the tested ones), as in pyproject.toml.
TESTED: dict[str, tuple[str, str]] = {
    "torch": ("2.11", "2.14"),
    "transformers": ("5.23", "5.26"),
    "bitsandbytes": ("0.50", "0.51"),
}
# Checked only when the model uses it (quantized layers import it).
OPTIONAL = frozenset({"bitsandbytes"})


class VersionError(FxpeftError, RuntimeError):
    """An installed dependency is outside the versions fxpeft is tested with."""


def installed(package: str) -> str | None:
    """The installed version of ``package``, or None."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def outside(package: str, version: str) -> str | None:
    """Why ``version`` of ``package`` is outside ``TESTED``, or None when it is inside.

    >>> outside("transformers", "5.25.0") is None, outside("torch", "2.13.0+cpu") is None
    (True, True)
    >>> outside("transformers", "5.12.0")
    'transformers 5.12.0 is outside the versions fxpeft is tested with (>=5.23,<5.26)'
    """
    low, high = TESTED[package]
    base = Version(Version(version).base_version)
    if Version(low) <= base < Version(high):
        return None
    return f"{package} {version} is outside the versions fxpeft is tested with (>={low},<{high})"


def check_versions() -> None:
    """Raise ``VersionError`` for the first dependency outside ``TESTED`` (an optional one only
    once imported); with ``FXPEFT_UNTESTED_VERSIONS=1``, warn instead.

    >>> check_versions()
    """
    for package in TESTED:
        if package in OPTIONAL and package not in sys.modules:
            continue
        version = installed(package)
        why = outside(package, version) if version is not None else None
        if why is None:
            continue
        if os.environ.get("FXPEFT_UNTESTED_VERSIONS") == "1":
            warnings.warn(why, stacklevel=3)
        else:
            raise VersionError(f"{why}; install a tested one (pip install \"{package}>="
                               f"{TESTED[package][0]},<{TESTED[package][1]}\"), or set "
                               f"FXPEFT_UNTESTED_VERSIONS=1 to try it anyway")
