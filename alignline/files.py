"""The one place alignline reads and writes its small files: JSON, JSONL, text and bytes.

    from alignline.files import atomic_open, read_json, read_jsonl, write_bytes, write_json, write_jsonl, write_text
    write_jsonl(path, rows)              # path first, like every writer here
    rows = read_jsonl(path, limit=100)   # a bad line is named as file:line

Every write is atomic: the data goes to a temp file in the same directory, is flushed and fsynced,
and replaces the target with `os.replace`. A crash, Ctrl-C or a full disk leaves the old file (or
none) and no temp file, never half a file. The readers raise `alignline.artifacts.StageError` (a
user error) naming the file and line, since what they read was written by a stage.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def _stage_error(message: str) -> Exception:
    from alignline.artifacts import StageError  # artifacts imports this module

    return StageError(message)


@contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Open a temp file next to `path` ("w" text UTF-8, or "wb"); on a clean exit it is flushed, fsynced
    and renamed over `path`, on an exception removed. Makes the parent dir."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)  # a failed write (disk full, Ctrl-C) leaves the old file and no temp
        raise


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_open(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_open(path) as fh:
        fh.write(text)
    return Path(path)


def write_json(path: str | Path, data: Any) -> Path:
    """Indented UTF-8 JSON, atomically."""
    return write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """One JSON object per line (UTF-8, not ASCII-escaped), streamed, atomically."""
    with atomic_open(path) as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return Path(path)


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _stage_error(f"{path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise _stage_error(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); the file is corrupted, "
                           "re-run the stage that wrote it") from None


def read_jsonl(path: str | Path, limit: int | None = None) -> list[dict]:
    """The first `limit` (default: all) JSON rows of `path`; bad lines are named by file:line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; the stage that writes it (for data files: "
                                "`alignline stage data`) has not run in this run directory")
    rows = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if limit is not None and len(rows) >= limit:
                break
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise _stage_error(f"{path}:{i}: not valid JSON ({exc.msg})") from None
    return rows


def fsync_tree(root: Path) -> None:
    """Flush every file under `root` and the directories themselves, so a rename publishes complete data."""
    for p in sorted(root.rglob("*"), reverse=True) + [root]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EBADF):  # a file system without fsync on dirs
                raise
        finally:
            os.close(fd)


def remove_path(path: Path) -> None:
    """Delete a file, symlink or directory tree; nothing when it does not exist."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
