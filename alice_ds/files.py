"""Atomic file writes: a file either appears whole under its name or not at all (a killed process
leaves at most a hidden temporary next to it, never a truncated file under the real name); and the
one JSON reader whose errors name the file.

Every writer of the project goes through `atomic_path`: the cache, datalists, phantoms, SAM models
and embeddings, checkpoints and exported weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alice_ds.errors import DataError

TMP_MARK = ".tmp-"
"""Temporaries are named `.<name>.tmp-<pid><suffix>`: hidden, and the pid tells a live writer's
temporary from one a killed run left behind (`stale_temporaries`)."""


@contextmanager
def atomic_path(path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to `path`; when the block ends it is renamed over `path`, when
    the block raises it is removed. `suffix` keeps an extension that a writer dispatches on
    (`nib.save` needs `.nii.gz`)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path, text: str, durable: bool = False) -> Path:
    """Write `text` to `path` atomically (parent folders created); returns `path`. `durable`: also on
    the disk when this returns (the file and the folder entry fsynced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
        if durable:
            fsync_path(tmp)
    if durable:
        fsync_path(path.parent)
    return path


def fsync_path(path) -> None:
    """Flush a file's (or a folder's: its entries') data to the disk, so a crash of the machine after
    a rename cannot leave a name that points at missing blocks."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path, missing: str):
    """The JSON document in `path`; a `DataError` naming the file when it does not exist (`missing`
    says what that means to the caller) or does not hold JSON text."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(path, missing) from None
    except json.JSONDecodeError as e:
        raise DataError(path, f"not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except (UnicodeDecodeError, IsADirectoryError) as e:
        raise DataError(path, f"not a JSON text file ({type(e).__name__})") from None


def stale_temporaries(folder) -> list[Path]:
    """Temporaries in `folder` whose writing process is gone (a killed run's leftovers)."""
    out = []
    for p in Path(folder).glob(f".*{TMP_MARK}*"):
        pid = p.name.rsplit(TMP_MARK, 1)[-1].split(".", 1)[0]
        if not (pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid))):
            out.append(p)
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
