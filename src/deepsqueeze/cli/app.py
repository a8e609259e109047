"""The typer app. Each command lives in its own module with ``register(app)``; heavy imports stay lazy.

User errors (``DeepsqueezeError``) are caught here, once: one line on stderr, exit code 2.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from typing import Any

import typer

COMMAND_MODULES: tuple[str, ...] = (
    "inspect",
    "train",
    "evaluate",
    "compress",
    "plan",
    "bench",
    "demo",
    "sensitivity",
    "recipes",
    "search",
    "report",
    "export",
    "generate",
)

from typer.core import TyperGroup  # noqa: E402


def _plain_metavars(params: list) -> None:
    """Help shows ``--out OUT`` / ``--report`` / ``MODEL``, not typer's ``<path>`` / ``<bool>`` / ``<str>`` labels."""
    for param in params:
        if param is None or getattr(param, "deepsqueeze_plain", False):
            continue
        param.deepsqueeze_plain = True
        if param.param_type_name == "argument":
            param.display_type_rich = lambda ctx: None  # the name column already says MODEL
        if param.metavar is None:
            param.metavar = "" if getattr(param, "is_flag", False) else (param.name or "value").upper()


class _Group(TyperGroup):
    """The app's group: plain metavars in every command's help; the main help lists recipes and stage types."""

    def get_command(self, ctx, name):  # type: ignore[no-untyped-def]
        command = super().get_command(ctx, name)
        if command is not None:
            _plain_metavars([*command.params, command.get_help_option(ctx)])
        return command

    def format_help(self, ctx, formatter):  # type: ignore[no-untyped-def]
        from deepsqueeze.cli._common import brief_listing

        _plain_metavars([*self.params, self.get_help_option(ctx)])
        self.epilog = brief_listing()
        return super().format_help(ctx, formatter)


def _version(value: bool) -> None:
    if value:
        from deepsqueeze._version import __version__

        print(f"deepsqueeze {__version__}")
        raise typer.Exit()


app = typer.Typer(
    cls=_Group,
    name="deepsqueeze",
    help="Make trained PyTorch models smaller and faster, and prove it with measured size, speed and quality.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Make trained PyTorch models smaller and faster, and prove it with measured size, speed and quality."""


for _name in COMMAND_MODULES:
    try:
        _module = importlib.import_module(f"deepsqueeze.cli.{_name}")
    except ModuleNotFoundError as _exc:
        if _exc.name != f"deepsqueeze.cli.{_name}":
            raise
        continue
    _module.register(app)


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """Warnings on stderr as ``warning: message``, one line: no source path, no code line."""
    from deepsqueeze.errors import one_line

    print(f"warning: {one_line(message)}", file=sys.stderr if file is None else file)


#: Loggers of libraries imported under the commands (transformers imports torchao where it is installed) that log
#: optional native libraries they cannot load and deprecations of their own: not the user's business on a console.
QUIET_LOGGERS = ("torchao", "torch.utils._pytree", "executorch")


def _quiet_library_loggers() -> None:
    import logging

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def _interrupted(exc: KeyboardInterrupt | None) -> None:
    """Exit 130 / 143 with ``interrupted`` / ``terminated`` for ``exc`` (nothing when None). Error paths call it with
    ``signals.received_interrupt()``: a command that failed after a signal a library swallowed ends as interrupted."""
    if exc is None:
        return
    from deepsqueeze.core import signals

    print(signals.interrupted_line(exc), file=sys.stderr)
    sys.exit(signals.exit_code(exc))


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one line and exit code 2, Ctrl-C prints ``interrupted`` and exits
    130, SIGTERM ``terminated`` and 143 (both after the same cleanup, see ``core.signals``).

    The click command is invoked directly rather than through typer's ``main``: with ``standalone_mode=False``
    that turns ``KeyboardInterrupt`` and ``typer.Exit`` into a *returned* exit code, which is easy to drop.
    """
    from deepsqueeze.core import signals
    from deepsqueeze.errors import DeepsqueezeError, one_line

    args = sys.argv[1:] if argv is None else list(argv)
    signals.install()
    warnings.showwarning = _show_warning
    _quiet_library_loggers()
    try:
        command = typer.main.get_command(app)
        with command.make_context("deepsqueeze", args) as ctx:
            command.invoke(ctx)
    except KeyboardInterrupt as exc:
        _interrupted(exc)
    except DeepsqueezeError as exc:
        _interrupted(signals.received_interrupt())
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:  # a path the system refuses (too long, no permission, a device full): the input's fault
        _interrupted(signals.received_interrupt())
        where = f" ({one_line(exc.filename, 160)})" if exc.filename else ""
        print(f"error: {exc.strerror or one_line(exc)}{where}: check the path and its folder", file=sys.stderr)
        sys.exit(2)
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", getattr(exc, "code", 0))
        sys.exit(code)
    except Exception as exc:
        _interrupted(signals.received_interrupt())
        # Usage errors come from click, or from the copy of click that newer typer vendors: match by shape.
        if callable(getattr(exc, "show", None)) and hasattr(exc, "exit_code"):
            exc.show()
            sys.exit(2)
        if type(exc).__name__ == "Abort":
            sys.exit(1)
        raise
    except BaseException as exc:
        # a native parser's panic (pyo3's PanicException, from tokenizers or safetensors on a hostile file) is a
        # BaseException that passes every ``except Exception``: it is the input's fault, one line
        if type(exc).__name__ != "PanicException":
            raise
        _interrupted(signals.received_interrupt())
        print(f"error: a native parser failed on the input ({one_line(exc, 200)}): the file is malformed or hostile",
              file=sys.stderr)
        sys.exit(2)
