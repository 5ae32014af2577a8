"""Writing a file whole or not at all: a temporary file beside the destination, renamed over it
only when it is complete. Readers see the old content or the new, never a part; an error or
Ctrl-C while writing leaves the destination as it was and no temporary file behind.

Standard library only; errors are OSError (callers that report their own errors wrap them).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["replacing", "write_text"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def replacing(target: str | os.PathLike[str]) -> Iterator[str]:
    """The path of a new empty temporary file in ``target``'s folder (named ``.NAME.*.tmp``),
    to be written in the block. When the block ends without an exception the file takes
    ``target``'s permissions (or, for a new file, those the umask gives) and replaces ``target``;
    otherwise (an error, Ctrl-C) it is removed and ``target`` is left untouched. A symbolic link
    is followed: the file it points to is replaced, as writing to the link would. OSError when
    the temporary file cannot be created."""
    target = Path(os.path.realpath(target))
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield tmp
        mode = target.stat().st_mode & 0o7777 if target.exists() else 0o666 & ~_umask()
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(target: str | os.PathLike[str], text: str) -> None:
    """Writes ``text`` to ``target`` through :func:`replacing` (with ``open``'s default encoding,
    as :meth:`pathlib.Path.write_text`)."""
    with replacing(target) as tmp, open(tmp, "w") as f:
        f.write(text)
