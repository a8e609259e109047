"""Where a study lives: its ``out`` folder and its Optuna storage (SQLite under ``out`` by default, so the
same command resumes it; or a PostgreSQL URL several workers share), opened while other workers may be
racing to create it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from deepsqueeze.core.files import make_folder
from deepsqueeze.errors import ArtifactError, DeepsqueezeError, RecipeError, redact

STORAGE_SCHEMES = ("sqlite:///", "postgresql://", "postgresql+psycopg://")


STUDY_FILES = ("study.db", "summary.json", "best.yaml", "front", "trials")


# What optuna logs that the search says itself: its load report (a study created, an existing one used) and its
# per-trial reports (finished, pruned, failed with a traceback).
_SAID_BY_SEARCH = ("A new study created", "Using an existing study", "Trial ")


class _OwnTrialReports(logging.Filter):
    """Drops the optuna records deepsqueeze says itself: the load report (the search names the study it created
    or continues, with the trials stored, after checking the stored study is its own: same objectives, same
    space) and the per-trial reports (the search's progress lines and ``trial N: fail ERROR`` lines). Every
    other record passes, at optuna's own level, as one line without a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith(_SAID_BY_SEARCH):
            return False
        record.exc_info, record.exc_text = None, None
        return True


def own_trial_reports() -> None:
    """Install :class:`_OwnTrialReports` on optuna's log handlers (once); optuna's level is left as it is."""
    import optuna

    optuna.logging.get_logger("optuna")  # makes sure optuna's own handler exists
    for handler in logging.getLogger("optuna").handlers:
        if not any(isinstance(f, _OwnTrialReports) for f in handler.filters):
            handler.addFilter(_OwnTrialReports())


def prepare_out(out: Path) -> None:
    """Make ``out`` the study folder, before any work: not a link, and if it exists, a folder that is empty
    or holds a study deepsqueeze wrote (``RecipeError`` / ``ArtifactError`` otherwise, one line)."""
    if out.is_symlink():
        raise ArtifactError(f"--out {out} is a symbolic link: deepsqueeze never writes through one; name a folder")
    if out.exists() and not out.is_dir():
        raise RecipeError(f"--out {out} is a file: give a folder for the study")
    if out.is_dir() and any(out.iterdir()) and not any((out / name).exists() for name in STUDY_FILES):
        raise ArtifactError(f"--out {out} holds files deepsqueeze did not write: name a new or empty folder")
    make_folder(out, "the study folder", "summary.json")


def default_storage(out: Path) -> str:
    return f"sqlite:///{(out / 'study.db').resolve()}"


def check_storage(storage: str | None) -> None:
    """``RecipeError`` for a storage URL deepsqueeze does not open (before any work)."""
    if storage is not None and not storage.startswith(STORAGE_SCHEMES):
        raise RecipeError(f"--storage takes sqlite:///FILE or postgresql://USER@HOST:PORT/DB, got {storage!r}")


def study_url(storage: str | None, out: Path) -> str:
    """The SQLAlchemy URL of the study: ``storage`` (PostgreSQL through psycopg 3), else SQLite under ``out``."""
    url = storage or default_storage(out)
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return url


def open_study(url: str, study_name: str, directions: list[str], shown: str) -> Any:
    """Create or load the study at ``url``; any failure is one ``RecipeError`` naming ``shown`` (the storage
    as the user wrote it, its password redacted)."""
    try:
        return create_or_load_study(url, study_name, directions)
    except ImportError as exc:
        raise RecipeError(f"storage {redact_url(shown)} needs a driver: pip install 'psycopg[binary]' ({exc})") from None
    except Exception as exc:  # sqlalchemy / optuna errors: connection refused, auth failure, ...
        if isinstance(exc, DeepsqueezeError):
            raise
        raise RecipeError(f"cannot open the study storage {redact_url(shown)}: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200]}") from None


def create_or_load_study(url: str, study_name: str, directions: list[str], attempts: int = 6) -> Any:
    """Create or load the study; workers starting together race to create the storage's tables, so a
    failure to open is retried a few times (the loser finds the tables and the study made by the winner)."""
    import optuna

    for attempt in range(attempts):
        try:
            return optuna.create_study(storage=url, study_name=study_name, directions=directions,
                                       load_if_exists=True)
        except ImportError:
            raise
        except Exception:
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def redact_url(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':')[0]}@{host}"
    return redact(url)
