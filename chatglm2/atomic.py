"""Writes that never leave a half-written file or directory behind: build beside the target, then rename.

The temporary sibling is named `.{target}.XXXXXXXX.tmp` and locked (flock) while it is being written, so a later write
of the same target can tell what a killed process left behind (unlocked) from what a running one is writing (locked),
and remove only the former.
"""
import fcntl
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def honour_umask(path: str | os.PathLike) -> None:
    """Give a file or folder we created the mode the umask gives new ones: mkstemp, mkdtemp and safetensors'
    save_file make them owner-only, unlike their siblings."""
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~_umask())


def remove_stale_temporaries(path: Path) -> None:
    """Delete the temporary siblings of `path` that a killed write left: named as this module names them and not
    locked by a running writer. Nothing else is touched."""
    if not path.parent.is_dir():
        return
    # tempfile's names: the prefix, 8 characters of [a-z0-9_], the suffix
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")
    for candidate in path.parent.iterdir():
        if not pattern.fullmatch(candidate.name) or candidate.is_symlink():
            continue
        try:
            fd = os.open(candidate, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:  # gone meanwhile, or not ours to open
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if candidate.is_dir():
                shutil.rmtree(candidate)
            else:
                candidate.unlink()
        except BlockingIOError:
            pass  # its writer is still running
        finally:
            os.close(fd)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's directory, to be written in place; it replaces `path` only if the block
    succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held until closed: marks it as being written
    try:
        yield Path(tmp)
        honour_umask(tmp)
        os.replace(tmp, path)
    finally:
        os.close(fd)
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; it becomes `path` (replacing an old one) only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    fd = os.open(tmp, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held until closed: marks it as being written
    try:
        yield tmp
        honour_umask(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        os.close(fd)
        if tmp.exists():
            shutil.rmtree(tmp)
