"""Adapter folders on disk, replaced atomically and read as one version (``fxpeft.save`` and
``fxpeft.load`` write and read through these).

Atomic saves. A reader sees the complete old folder or the complete new one, never a mix:

1. a save writes the whole new folder into a sibling ``.<name>.fxpeft-new-<pid>-<random>``
   and flushes it to disk (fsync);
2. renames the old folder ``<name>`` to ``.<name>.fxpeft-old``;
3. renames the new folder to ``<name>``;
4. renames ``.<name>.fxpeft-old`` to ``.<name>.fxpeft-del-<pid>-<random>``, then deletes that,
   its ``adapter_config.json`` first.

``.<name>.fxpeft-old`` is only ever made by a rename of a complete folder and only ever left by
a rename, so it is complete whenever it exists: a deletion that dies half-way leaves a
``-del-`` folder, which nothing reads and the next save removes. Whenever the process dies,
``<name>`` holds the complete old or the complete new folder; only between steps 2 and 3 it is
absent, and then ``.<name>.fxpeft-old`` holds the complete old one: ``load`` reads that, and the
next ``save`` renames it back before doing anything else (or, if ``<name>`` is there, deletes
it). A set-aside folder without its ``adapter_config.json`` (an older fxpeft deleted it in place,
config first) is half-deleted: it is never read nor put back, only removed. A save that raises
leaves the old folder untouched and removes its staging folder; the next save also removes
staging and ``-del-`` folders that dead processes left. Saving replaces the whole folder, so it
only replaces an adapter folder (plain files, among them ``adapter_config.json`` or the
weights): anything else is an error, never deleted.

``load`` reads every file through one handle on the folder (POSIX), so renames during the read
cannot mix two versions. A folder is deleted config first, and a read that finds its config gone
at the end starts again, so a half-deleted old folder is never taken for a complete one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import stat
from pathlib import Path
from typing import Callable

from fxpeft.errors import FxpeftError

CONFIG, WEIGHTS, RULES = "adapter_config.json", "adapter_model.safetensors", "fxpeft_rules.toml"
log = logging.getLogger("fxpeft")
_TEXT_LIMIT = 16 * 2 ** 20  # bytes; a config or rule file is kilobytes, never this
_READ_ATTEMPTS = 8
_NEW, _OLD, _DEL = ".fxpeft-new-", ".fxpeft-old", ".fxpeft-del-"


class AdapterFileError(FxpeftError, ValueError):
    """An adapter folder that cannot be read or does not fit the model; names file and key."""


# --- save: replacing the folder atomically ------------------------------------------------------

def _target(directory: "str | Path") -> Path:
    """The real folder (a symlink keeps pointing at the new content)."""
    return Path(os.path.realpath(directory))


def _aside(directory: Path) -> Path:
    """Where a save keeps the old folder between its two renames; ``load`` falls back to it."""
    return directory.with_name(f".{directory.name}{_OLD}")


def _complete_aside(directory: Path) -> Path | None:
    """The set-aside old folder if it is complete (see the module docstring), else None."""
    aside = _aside(directory)
    return aside if aside.is_dir() and (aside / CONFIG).is_file() else None


def _owned_name(directory: Path, tag: str) -> Path:
    """A sibling named ``.<name><tag><pid>-<random>``, so ``_tidy`` can tell whether its owner
    lives."""
    return directory.with_name(f".{directory.name}{tag}{os.getpid()}-{secrets.token_hex(4)}")


def _fsync(path: Path) -> None:
    """Flush a file or folder to disk, so a rename never publishes unwritten data."""
    folder = path.is_dir()
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if folder:  # Windows cannot open a folder
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not folder:  # some file systems cannot flush a folder; a file must flush
            raise
    finally:
        os.close(fd)


def _remove(folder: Path) -> None:
    """Delete a folder, its config first (the sign readers check; see ``_snapshot``)."""
    with contextlib.suppress(FileNotFoundError):  # another save may have got there first
        names = sorted(os.listdir(folder), key=lambda name: name != CONFIG)
        for name in names:
            if (folder / name).is_dir() and not (folder / name).is_symlink():
                shutil.rmtree(folder / name)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(folder / name)
        os.rmdir(folder)


def _alive(pid: int) -> bool:
    """Whether the process that named a staging folder may still be writing it."""
    if pid == os.getpid() or os.name != "posix":  # os.kill on Windows would end the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # someone else's process
        return True
    return True


def _tidy(directory: Path) -> None:
    """Finish what a save that died left: put a set-aside old folder back (or drop it if the
    new one made it into place), and remove staging folders of dead processes."""
    aside = _aside(directory)
    if aside.is_dir():
        if directory.exists() or _complete_aside(directory) is None:
            _drop(aside, directory)  # the new folder is in place, or the old one half-deleted
        else:
            os.rename(aside, directory)
    for tag in (_NEW, _DEL):
        prefix = f".{directory.name}{tag}"
        for entry in directory.parent.iterdir():
            pid = entry.name[len(prefix):].split("-")[0]
            if entry.name.startswith(prefix) and pid.isdigit() and (
                    not _alive(int(pid)) or (tag == _DEL and int(pid) == os.getpid())):
                _remove(entry)  # a -del- folder of this process: a deletion it did not finish


def _drop(aside: Path, directory: Path) -> None:
    """Step 4: rename the set-aside folder out of the way (atomically), then delete it."""
    doomed = _owned_name(directory, _DEL)
    with contextlib.suppress(FileNotFoundError):  # another save may have got there first
        os.rename(aside, doomed)
    _remove(doomed)


def _check_replaceable(directory: Path) -> None:
    """Saving replaces the whole folder: refuse one that is more than an adapter folder."""
    if not directory.exists():
        return
    if not directory.is_dir():
        raise AdapterFileError(f"{directory}: exists and is not a folder")
    entries = list(directory.iterdir())
    folder = next((entry for entry in entries if not entry.is_file()), None)
    if folder is not None:
        raise AdapterFileError(f"{folder}: saving replaces {directory} as a whole and would "
                               f"delete this (another adapter?); save to another folder")
    if entries and not any(entry.name in (CONFIG, WEIGHTS) for entry in entries):
        raise AdapterFileError(f"{directory}: not an adapter folder (no {CONFIG}); saving "
                               f"replaces a folder as a whole, so it only replaces adapter folders")


def _make_parent(directory: Path) -> None:
    """Create the folders above ``directory``; a file in the way is a one-line error."""
    blocking = next((p for p in (directory.parent, *directory.parent.parents)
                     if os.path.lexists(p) and not p.is_dir()), None)
    if blocking is not None:
        raise AdapterFileError(f"{directory}: cannot be made, {blocking} is a file, not a "
                               f"folder; save to a path whose folders are folders")
    directory.parent.mkdir(parents=True, exist_ok=True)


def _staging(directory: Path) -> Path:
    """A new, empty sibling folder, named so that ``_tidy`` can tell whether its owner lives."""
    while True:
        staging = _owned_name(directory, _NEW)
        with contextlib.suppress(FileExistsError):
            os.mkdir(staging)  # mode 0o777 less the umask, like any folder the user makes
            return staging


def _swap_in(staging: Path, directory: Path) -> None:
    """Steps 2-4 of the module docstring."""
    if not os.path.lexists(directory):
        os.rename(staging, directory)
        return
    aside = _aside(directory)
    os.rename(directory, aside)
    try:
        os.rename(staging, directory)
    except BaseException:
        os.rename(aside, directory)
        raise
    _fsync(directory.parent)
    try:
        _drop(aside, directory)
    except OSError as err:  # the new folder is in place: the save succeeded; _tidy retries
        log.warning("fxpeft.save: could not remove the old folder %s yet: %s", aside, err)


def replace_folder(directory: "str | Path", writers: dict[str, Callable[[Path], None]]) -> None:
    """Make ``directory`` hold exactly the files ``writers`` write (each called with its path),
    atomically: see the module docstring.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp()) / "a"
    >>> replace_folder(folder, {CONFIG: lambda p: p.write_text("{}")})
    >>> replace_folder(folder, {WEIGHTS: lambda p: p.write_bytes(b"")})
    >>> [p.name for p in folder.parent.iterdir()], [p.name for p in folder.iterdir()]
    (['a'], ['adapter_model.safetensors'])
    """
    directory = _target(directory)
    _make_parent(directory)
    _tidy(directory)
    _check_replaceable(directory)
    staging = _staging(directory)
    file_mode = stat.S_IMODE(os.stat(staging).st_mode) & 0o666  # 0o666 less the umask
    try:
        for name, write in writers.items():
            write(staging / name)
            os.chmod(staging / name, file_mode)  # safetensors writes 0o600 whatever the umask
            _fsync(staging / name)
        _fsync(staging)
        _swap_in(staging, directory)
    finally:
        if os.path.lexists(staging):
            _remove(staging)
    _fsync(directory.parent)


# --- load: reading the folder -------------------------------------------------------------------

def _current(directory: Path) -> Path:
    """``directory``, or the old folder a save set aside in the instant between its renames."""
    aside = _complete_aside(_target(directory))
    return aside if not os.path.exists(directory) and aside is not None else directory


def _read_member(folder: Path, handle: int | None, name: str) -> bytes | None:
    """One file of the folder, read through the folder's handle; None if absent."""
    path = folder / name
    try:  # O_NONBLOCK: a FIFO in the folder must not hang the load
        fd = os.open(name if handle is not None else path,
                     os.O_RDONLY | getattr(os, "O_NONBLOCK", 0), dir_fd=handle)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise AdapterFileError(f"{path}: cannot open: {err.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise AdapterFileError(f"{path}: not a regular file")
        if name != WEIGHTS and info.st_size > _TEXT_LIMIT:
            raise AdapterFileError(f"{path}: {info.st_size} bytes, more than any {name} holds "
                                   f"(at most {_TEXT_LIMIT})")
        with os.fdopen(fd, "rb", closefd=False) as file:
            return file.read()
    except OSError as err:
        raise AdapterFileError(f"{path}: cannot read: {err.strerror}") from None
    finally:
        os.close(fd)


def _open_folder(folder: Path) -> int | None:
    """A handle on the folder (None where the OS reads files by path only)."""
    if os.open not in os.supports_dir_fd:
        return None
    return os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _snapshot(directory: Path, folder: Path) -> dict[str, bytes] | None:
    """The adapter files of ``folder`` as one version, or None when a save changed it meanwhile.

    A folder is deleted config first, so a config still there after every read means none of
    the reads saw a half-deleted folder; without a config, the folder must still be in place.
    """
    handle = _open_folder(folder)
    try:
        files = {name: data for name in (CONFIG, WEIGHTS, RULES)
                 if (data := _read_member(folder, handle, name)) is not None}
        if handle is None:
            return files
        if CONFIG in files:
            with contextlib.suppress(FileNotFoundError):
                os.stat(CONFIG, dir_fd=handle)
                return files
            return None
        still = folder == directory and os.path.samestat(os.stat(folder), os.fstat(handle))
        return files if still else None
    finally:
        if handle is not None:
            os.close(handle)


def _read_folder(directory: Path) -> tuple[Path, dict[str, bytes]]:
    """Which folder was read (``directory`` or its set-aside old copy) and its files' bytes."""
    for _ in range(_READ_ATTEMPTS):
        folder = _current(directory)
        try:
            files = _snapshot(directory, folder)
        except FileNotFoundError:  # the folder itself: absent, or renamed an instant ago
            files = {} if not os.path.lexists(folder) and _current(directory) == folder else None
        except NotADirectoryError:
            raise AdapterFileError(f"{folder}: not a folder; an adapter folder holds {CONFIG} "
                                   f"and {WEIGHTS}") from None
        except OSError as err:
            raise AdapterFileError(f"{folder}: cannot read: {err.strerror}") from None
        if files is not None:
            return folder, files
    raise AdapterFileError(f"{directory}: changed during each of {_READ_ATTEMPTS} reads; is "
                           f"another process saving into it?")


# --- adapter files among other files (the HF Trainer's checkpoint folders) ----------------------

def replace_file(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through a sibling temporary file and one rename: never half-written."""
    temp = path.with_name(f".{path.name}{_NEW}{os.getpid()}-{secrets.token_hex(4)}")
    os.close(os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # 0o666 less the umask
    try:
        mode = stat.S_IMODE(os.stat(temp).st_mode)
        write(temp)
        os.chmod(temp, mode)  # safetensors writes 0o600 whatever the umask
        _fsync(temp)
        os.replace(temp, path)
    finally:
        if os.path.lexists(temp):
            os.unlink(temp)


def write_new_folder(directory: Path, write: Callable[[Path], None]) -> None:
    """Create ``directory`` from what ``write`` puts into a staging sibling, in one rename: it
    appears complete or not at all. It must not exist (a new folder never replaces one).

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp()) / "merged"
    >>> write_new_folder(folder, lambda staging: (staging / "x.txt").write_text("x"))
    >>> [p.name for p in folder.parent.iterdir()], [p.name for p in folder.iterdir()]
    (['merged'], ['x.txt'])
    """
    _make_parent(directory)
    staging = _staging(directory)
    try:
        write(staging)
        _fsync(staging)
        os.rename(staging, directory)
    finally:
        if os.path.lexists(staging):
            _remove(staging)
    _fsync(directory.parent)
