"""Writing files safely: atomic replacement, temporaries that never outlive a signal, no writes through links.

Every file deepsqueeze writes (artifacts, exports, reports, study answers, caches) goes through
:func:`atomic_write`: a temporary in the target's folder, fsynced, then renamed over the target, so a reader
sees the old file or the new one, never half of one; concurrent writers each use their own temporary.
:func:`check_output` states the ``--out`` rule: never through a symbolic link, and an existing path is
replaced only when deepsqueeze wrote it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deepsqueeze.core.signals import deferred_signals, published
from deepsqueeze.errors import ArtifactError

#: The ``--out`` rule, stated in ``--help`` of every command that writes.
OUT_RULE = ("never written through a symbolic link; an existing path is replaced only if deepsqueeze wrote it")


def check_writable(path: str | os.PathLike[str]) -> None:
    """Fail fast, before any work, if ``path`` cannot be written as a file.

    Raises ``ArtifactError`` when ``path`` is a folder, its folder is missing, or the folder refuses a new
    file (permissions, read-only filesystem): a probe file is created there and removed at once.
    """
    path = Path(path)
    if path.is_dir():
        raise ArtifactError(f"{path} is a folder: name a file inside it, e.g. {path / 'model.dsq'}")
    if not path.parent.is_dir():
        raise ArtifactError(f"cannot write {path}: folder {path.parent} does not exist")
    try:
        with deferred_signals():
            fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
            os.close(fd)
            discard(probe)
    except OSError as exc:
        raise ArtifactError(f"cannot write {path}: {exc.strerror or exc} in {path.parent}; choose another location"
                            ) from None


def atomic_write(path: Path, write: Callable[[Any], object]) -> None:
    """Call ``write(binary file)`` on a temporary file in ``path``'s folder, fsync, then rename it to ``path``.

    The file gets the usual permissions (0666 less the umask), not mkstemp's private 0600.
    """
    path = Path(path)
    if path.is_symlink():
        raise ArtifactError(f"{path} is a symbolic link: deepsqueeze never writes through one; name a plain path")
    check_writable(path)
    tmp = None
    try:
        with deferred_signals():
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        publish(tmp, path)
    except OSError as exc:  # disk full, a folder appearing at ``path`` meanwhile ...
        discard(tmp)
        raise ArtifactError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        discard(tmp)
        raise


def publish(source: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Rename the finished ``source`` onto ``path`` and record it as written (``core.signals.published``), both
    before a signal is let through: an interrupted command's last line names every file it put in place."""
    with deferred_signals():
        os.replace(source, path)
        published(path)


def discard(path: str | os.PathLike[str] | None) -> None:
    """Remove the temporary file or folder ``path`` (nothing if None or gone) with SIGINT / SIGTERM held back until
    it is gone: cleanup that a second signal, or the first one arriving late, cuts short leaves staging behind."""
    if path is None:
        return
    path = Path(path)
    with deferred_signals():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """:func:`atomic_write` of UTF-8 ``text``."""
    data = text.encode("utf-8")
    atomic_write(Path(path), lambda fh: fh.write(data))


def check_output(path: str | os.PathLike[str], ours: Callable[[Path], bool] | None = None,
                 what: str = "file") -> Path:
    """``path`` with its folder resolved and its own name kept, once it may be written (``ArtifactError``
    otherwise): it is not a symbolic link (dangling or not), and if it exists, ``ours(path)`` says
    deepsqueeze wrote it (without ``ours``, nothing existing is replaced)."""
    given = Path(path)
    if given.is_symlink():
        raise ArtifactError(f"{given} is a symbolic link: deepsqueeze never writes through one; name a plain "
                            f"{what} path")
    out = given.parent.resolve() / given.name
    if out.exists() and (ours is None or not ours(out)):
        raise ArtifactError(f"{out} exists and is not a {what} deepsqueeze wrote: choose another --out path")
    return out


def make_folder(path: Path, what: str, probe: str) -> None:
    """Create the folder ``path`` (``what`` names it in errors) and check that a file named ``probe`` can be
    written in it, before any work; ``ArtifactError`` (one line) otherwise."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArtifactError(f"cannot create {what} {path}: {exc.strerror or exc}; choose another folder") from None
    check_writable(path / probe)
