"""Every adapter of a graph in one folder, in PEFT's multi-adapter layout: what
``gm.save_pretrained`` writes and what every Trainer checkpoint holds
(``fxpeft.tools.trainer.AdapterCheckpoints``). ``default`` goes in the folder itself, any other
adapter in a subfolder of its name, as ``PeftModel.save_pretrained`` does; other files in the
folder (a tokenizer, the optimizer's state) stay.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

from fxpeft.errors import FxpeftError
from fxpeft.io.serialize import restore, write_into
from fxpeft.registry import provide
from fxpeft.runtime.adapted_module import AdaptedModule


def adapter_folders(gm: AdaptedModule, directory: "str | Path",
                    adapters: "Sequence[str] | None" = None) -> Iterator[tuple[str, Path]]:
    """(adapter, folder) for each adapter of ``gm`` (or each of ``adapters``), in PEFT's layout.

    >>> import torch, fxpeft
    >>> gm = fxpeft.rewrite(torch.nn.Sequential(torch.nn.Linear(2, 2)),
    ...                     fxpeft.rules.Rule(where=fxpeft.rules.Where(path=["0"])))
    >>> _ = gm.add_adapter("sql", fxpeft.rules.Rule(where=fxpeft.rules.Where(path=["0"])))
    >>> [(name, str(folder)) for name, folder in adapter_folders(gm, "ckpt")]
    [('default', 'ckpt'), ('sql', 'ckpt/sql')]
    """
    names = gm.adapter_names if adapters is None else list(adapters)
    unknown = sorted(set(names) - set(gm.adapter_names))
    if unknown:
        raise FxpeftError(f"no adapter {unknown[0]!r} in this graph; it has {gm.adapter_names}")
    for adapter in names:
        yield adapter, Path(directory) if adapter == "default" else Path(directory) / adapter


def save_adapters(gm: AdaptedModule, directory: "str | Path",
                  adapters: "Sequence[str] | None" = None) -> Path:
    """Write every adapter of ``gm`` (or those named) into ``directory``; returns it.

    >>> import tempfile, torch, fxpeft
    >>> gm = fxpeft.rewrite(torch.nn.Sequential(torch.nn.Linear(2, 2)),
    ...                     fxpeft.rules.Rule(where=fxpeft.rules.Where(path=["0"])))
    >>> sorted(p.name for p in save_adapters(gm, tempfile.mkdtemp()).iterdir())
    ['adapter_config.json', 'adapter_model.safetensors', 'fxpeft_rules.toml']
    """
    for adapter, folder in adapter_folders(gm, directory, adapters):
        write_into(gm, folder, adapter)
    return Path(directory)


def restore_adapters(gm: AdaptedModule, directory: "str | Path") -> None:
    """Copy the weights of every adapter folder under ``directory`` back into ``gm`` (resume)."""
    for adapter, folder in adapter_folders(gm, directory):
        restore(gm, folder, adapter)


# PeftModel.save_pretrained's keywords, and the values fxpeft writes for them
_SAVE_OPTIONS = {"safe_serialization": (True,), "save_embedding_layers": ("auto", False),
                 "state_dict": (None,)}


@provide("save_pretrained")
def save_pretrained(gm: AdaptedModule, save_directory: "str | Path", *,
                    selected_adapters: "Sequence[str] | None" = None, is_main_process: bool = True,
                    **options: Any) -> None:
    """``gm.save_pretrained(folder)``: PEFT's ``save_pretrained``; only the main process
    writes. A keyword fxpeft cannot honour is an error naming it.

    >>> import tempfile, torch, fxpeft
    >>> gm = fxpeft.rewrite(torch.nn.Sequential(torch.nn.Linear(2, 2)),
    ...                     fxpeft.rules.Rule(where=fxpeft.rules.Where(path=["0"])))
    >>> gm.save_pretrained(tempfile.mkdtemp(), safe_serialization=False)
    Traceback (most recent call last):
    ...
    fxpeft.errors.FxpeftError: save_pretrained(safe_serialization=False): fxpeft writes only safetensors adapter files (accepted: True)
    """
    for name, value in options.items():
        if name not in _SAVE_OPTIONS:
            raise FxpeftError(f"save_pretrained: unknown keyword {name!r}; fxpeft takes "
                              f"selected_adapters, is_main_process, {', '.join(_SAVE_OPTIONS)}")
        if not any(value is ok or (type(value) is type(ok) and value == ok) for ok in _SAVE_OPTIONS[name]):
            raise FxpeftError(f"save_pretrained({name}={value!r}): fxpeft writes only safetensors "
                              f"adapter files (accepted: {', '.join(map(repr, _SAVE_OPTIONS[name]))})")
    if is_main_process:
        save_adapters(gm, save_directory, selected_adapters)
