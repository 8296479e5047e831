"""Files written whole or not at all: write to a temporary sibling, then rename."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


class OutputPathError(ValueError):
    """An output path would replace one of the inputs it is made from."""


def check_output_apart(out: str | Path, inputs: Iterable[str | Path | None]) -> None:
    """Refuse an output directory that is, or holds, one of `inputs` or the working directory.

    Outputs replace their directory whole, so such an output would delete its own
    inputs (`--out .`: everything in the working directory). Call it before the work
    starts; `None` inputs are skipped.
    """
    target = Path(os.path.abspath(out))
    cwd = Path.cwd()
    if target == cwd or target in cwd.parents:
        raise OutputPathError(
            f"output directory {out} is the working directory or holds it: writing the output "
            "replaces the directory and everything in it; name a directory of its own"
        )
    for source in inputs:
        if source is None or not str(source):
            continue
        resolved = Path(os.path.abspath(source))
        if resolved == target or target in resolved.parents:
            raise OutputPathError(
                f"output directory {out} holds the input {source}: writing the output replaces "
                "the directory and would delete that input; choose another output directory"
            )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(tmp: Path, mode: int) -> None:
    """Give a temporary file or directory the mode a plain `open` or `mkdir` would have.

    `mkstemp` and `mkdtemp` create them readable by their owner alone, which would keep
    a server running as another user (Label Studio, an MLflow server) from reading them.
    """
    tmp.chmod(mode & ~_umask())


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path`.

    On an exception the temporary file is removed and `path` is untouched.
    """
    target = Path(os.path.abspath(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _publish(tmp_path, 0o666)
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory next to `path`; on success it replaces `path`."""
    check_output_apart(path, ())
    target = Path(os.path.abspath(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        _publish(tmp, 0o777)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, sort_keys=True) + "\n")


def split_lines(text: str) -> list[str]:
    """`text`'s lines, split at `\\n` and `\\r\\n` alone.

    `str.splitlines` also splits at U+2028, U+0085 and other separators that a JSON
    string written with `ensure_ascii=False` holds raw, which would cut a JSON Lines row
    (or a prompt) in two.
    """
    return [line.removesuffix("\r") for line in text.split("\n")]


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file; a bad line is an error naming file and line number."""
    rows = []
    with Path(path).open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON: {exc.msg}") from None
    return rows
