"""Files written under a temporary name and renamed when whole: no reader, and no crash, leaves
half a file under the real name."""

from __future__ import annotations

import os
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
