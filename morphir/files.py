"""Writing files so that a crash or a full disk mid-write never leaves a broken one.

Every file morphir writes (checkpoints, run outputs, exports, reports) goes to a temporary file
beside its target and is renamed into place only when complete; an existing file stays until then.

>>> atomic_write(Path("run/summary.json"), lambda f: f.write(text), binary=False)
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["replacing", "atomic_write"]


@contextlib.contextmanager
def replacing(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A new empty temporary file beside ``path``, moved onto ``path`` when the block succeeds and
    removed when it fails. Its mode follows the umask (``tempfile.mkstemp`` would make it 0600);
    ``suffix`` ends its name, for writers that look at the extension. A symbolic link is written
    through (the file it names is replaced); a path that is not a regular file (a directory, a
    device such as ``/dev/null``, a pipe) is refused with OSError and left alone.

    >>> with replacing("model.onnx") as tmp:
    ...     torch.onnx.export(model, x, tmp)
    """
    target = Path(os.path.realpath(path)) if os.path.islink(path) else Path(path)  # a link: write what it names
    if target.exists() and not target.is_file():
        raise OSError(errno.EEXIST, f"{target} exists and is not a regular file (a directory, a device or a pipe); "
                      "nothing is written over it: choose another path")
    tmp = target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp{suffix}"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[Any], Any], *, binary: bool = True) -> None:
    """Call ``write(f)`` on a file object for ``path`` (binary or text), flushed to disk and renamed
    into place; OSError (a full disk) propagates with ``path`` untouched.

    >>> atomic_write(Path("run/checkpoint.pt"), lambda f: f.write(data))
    """
    with replacing(path) as tmp:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_TRUNC), "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
