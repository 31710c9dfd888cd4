"""Files written under a temporary name and renamed when whole: no reader, and no crash, leaves
half a file under the real name."""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import secrets
import shutil
from pathlib import Path


def write_atomic(path: str | Path, text: str, *, mode: int | None = None) -> Path:
    """Write `text` to a temporary sibling (made with `mode` if given), then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        if mode is not None:
            tmp.chmod(mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def unwritable_reason(folder: str | Path) -> str | None:
    """Why files cannot be made in `folder` (created if missing): its nearest existing ancestor is
    a file, or is not writable. None when they can."""
    folder = Path(folder).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK):
        return f"{existing} is not writable"
    return None


TEMPORARY, ASIDE = ".tmp-", ".old-"  # hidden siblings .NAME.tmp-* (being written), .NAME.old-*


def temporary_sibling(dest: str | Path) -> Path:
    """A new empty folder `.NAME.tmp-*` beside `dest`, to write a whole folder in and then move
    to `dest` with `replace_folder`."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # mkdir, not mkdtemp: mkdtemp's mode 0700 would survive the rename, and a shared dataset or
    # run folder must get the umask's permissions like any folder
    tmp = dest.with_name(f".{dest.name}{TEMPORARY}{secrets.token_hex(4)}")
    tmp.mkdir()
    return tmp


def sibling_target(sibling: Path) -> Path:
    """The folder a `.NAME.tmp-*` or `.NAME.old-*` sibling was written for or moved aside from."""
    name = sibling.name[1:]
    for mark in (TEMPORARY, ASIDE):
        name = name.split(mark)[0]
    return sibling.with_name(name)


def replace_folder(new: str | Path, dest: str | Path) -> Path:
    """Put the whole folder `new` at `dest`, deleting what `dest` held.

    An existing `dest` is exchanged with `new` in one step where the system can (Linux's
    renameat2 RENAME_EXCHANGE), so that a kill never leaves `dest` missing; elsewhere it is moved
    aside to `.NAME.old-*` first. What it held is deleted last: a kill before that leaves it in
    a hidden sibling (see `stale_siblings`).
    """
    new, dest = Path(new), Path(dest)
    if not dest.exists():
        new.rename(dest)
        return dest
    if _exchange(new, dest):
        shutil.rmtree(new)  # now the old contents
        return dest
    old = dest.with_name(f".{dest.name}{ASIDE}{secrets.token_hex(4)}")
    dest.rename(old)
    new.rename(dest)
    shutil.rmtree(old)
    return dest


def stale_siblings(dest: str | Path) -> list[Path]:
    """Hidden `.NAME.tmp-*` and `.NAME.old-*` folders beside `dest`: writes of it that a kill
    cut short, or that are still running elsewhere."""
    dest = Path(dest)
    found = [p for mark in (TEMPORARY, ASIDE) for p in dest.parent.glob(f".{dest.name}{mark}*")]
    return sorted(p for p in found if p.is_dir())


def stale_notes(dest: str | Path) -> list[str]:
    """One line for each of `stale_siblings(dest)`, for a command line to print."""
    return [
        f"note: {stale} was left by a write of {dest} that was cut short (a kill, a full disk); "
        "delete it unless that write still runs"
        for stale in stale_siblings(dest)
    ]


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the system or file system cannot."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    at_cwd, rename_exchange = -100, 2  # AT_FDCWD, RENAME_EXCHANGE from linux/fcntl.h and fs.h
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EXDEV, errno.ENOTSUP):  # not here: rename twice
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    if hasattr(libc, "renameat2"):
        path_at = [ctypes.c_int, ctypes.c_char_p]  # a folder's descriptor, a path in it
        libc.renameat2.argtypes = [*path_at, *path_at, ctypes.c_uint]
        libc.renameat2.restype = ctypes.c_int
    return libc
