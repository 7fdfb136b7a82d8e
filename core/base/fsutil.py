"""Atomic file and directory writes: build in a temporary sibling, then rename into place, so a reader of the final
path never sees a half-written file, and a failure leaves nothing behind. Torch-free."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator


def current_umask() -> int:
    """The process umask, read without changing it where the system says it (Linux /proc), else set and restored."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | os.PathLike, directory: bool = False) -> None:
    """Give a file or directory made by tempfile (0600 / 0700, private by design) the mode a plain open() or
    mkdir() would have given it: 0666 or 0777 less the umask. Outputs are then as readable as the user's other
    files."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def make_temp_dir(out: Path) -> Path:
    """A temporary sibling directory of `out` (same file system, so it can be renamed into place), mode from the
    umask."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    follow_umask(tmp, directory=True)
    return tmp


class Busy(RuntimeError):
    """Another live process holds the lock; the message names its PID."""


@contextmanager
def process_lock(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive advisory lock on the file `path` (created if needed) while the block runs, or raise `Busy`
    at once when another process holds it: two processes writing one run directory would interleave checkpoints
    and stage markers. The holder's PID is written into the file for the message; the OS releases the lock when the
    holder exits, however it exits, so a leftover file never blocks anyone. A no-op where flock is not available."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise Busy(f"{what} is in use by another dxrag process (PID {holder}); wait for it to finish, or "
                       f"choose another directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield
    finally:
        os.close(fd)


def dir_lock(directory: str | os.PathLike):
    """An exclusive advisory lock (flock) on a directory, held while the block runs: writers that publish into the
    same directory take turns. A no-op where flock is not available."""
    try:
        import fcntl
    except ImportError:  # Windows
        return nullcontext()

    @contextmanager
    def held() -> Iterator[None]:
        fd = os.open(directory, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    return held()


def replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished temporary directory to `out`; an existing `out` is replaced only once `tmp` is complete."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


@contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to `out`; it replaces `out` when the block succeeds and is removed when it
    fails."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out)
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path next to `path` for any writer (pyarrow, pandas, safetensors); it replaces `path`
    when the block succeeds and is removed when it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        follow_umask(tmp)
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")
