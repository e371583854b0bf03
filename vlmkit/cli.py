"""The ``vlmkit`` command. Each subcommand lives next to the code it drives and is imported on use.

Errors: a user mistake (a bad value, a missing file, an unknown task …) is a ``UsageError``; every command prints
it as one line, ``vlmkit <command>: error: <what was given and what was expected>``, and exits with status 2.
``--debug`` (or ``VLMKIT_DEBUG=1``) shows the traceback instead. Anything else is a bug and keeps its traceback.
Commands validate what they can (arguments, stage specs, data records, images) before loading a model, inside
``user_input()``, which turns the ``ValueError`` / ``OSError`` / ``ImportError`` the library raises for bad input
into ``UsageError``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import math
import os
import re
import sys
from typing import Callable, Iterator

# subcommand -> ("module:function", one-line help). Each function takes argv (list[str]) and returns an exit code.
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("vlmkit.info:cli_main", "versions, supported families and which optional parts are installed"),
    "shapes": ("vlmkit.data.shapes:cli_main", "write the synthetic shapes benchmark to a folder"),
    "demo": ("vlmkit.demo:cli_main", "the main job: run the default model through the pipeline"),
    "eval": ("vlmkit.evaluation.runner:cli_main", "evaluate a model on benchmark tasks (eval/*.yaml)"),
    "finetune": ("vlmkit.train.cli:cli_main", "fine-tune with a PEFT recipe (adapters/*.yaml)"),
    "prune-viz": ("vlmkit.viz.pruning:cli_main", "draw which visual tokens FoPru keeps on an image (PNG)"),
}

DEBUG_ENV = "VLMKIT_DEBUG"


class UsageError(ValueError):
    """A user mistake: shown as one line naming the value and what was expected (exit status 2)."""


@contextlib.contextmanager
def user_input() -> Iterator[None]:
    """Inside the ``with``, errors mean bad input: ``ValueError`` (``UnicodeDecodeError`` included), ``OSError``
    (missing, unreadable or non-image files) and ``ImportError`` (a missing optional package) become
    ``UsageError`` with the same message. Use it around validation and model loading, not around the work."""
    try:
        yield
    except UsageError:
        raise
    except UnicodeDecodeError as err:  # its str() names no file; the readers that know the file say so
        raise UsageError(f"not UTF-8 text ({err.reason} at byte {err.start})") from err
    except (ValueError, OSError, ImportError) as err:
        raise UsageError(_message(err)) from err


def _message(err: BaseException) -> str:
    """One line: the error's text (``FileNotFoundError(2, 'No such file', 'x')`` as "No such file: 'x'")."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.strerror}: {os.fspath(err.filename)!r}"
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


def _debug(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")


def command(prog: str) -> Callable[[Callable[[list[str]], int]], Callable[[list[str]], int]]:
    """Decorator for a subcommand's ``cli_main(argv)``: a ``UsageError`` (raised anywhere inside, argument errors
    included) is printed as ``<prog>: error: <message>`` on stderr and the function returns 2; with ``--debug``
    in ``argv`` it propagates with its traceback."""

    def decorate(fn: Callable[[list[str]], int]) -> Callable[[list[str]], int]:
        @functools.wraps(fn)
        def cli_main(argv: list[str] | None = None) -> int:
            argv = list(sys.argv[1:] if argv is None else argv)
            try:
                return int(fn(argv) or 0)
            except UsageError as err:
                if _debug(argv):
                    raise
                print(f"{prog}: error: {_message(err)}", file=sys.stderr)
                return 2

        return cli_main

    return decorate


# ---------------------------------------------------------------------------------------------
# Argument parsing shared by every subcommand
# ---------------------------------------------------------------------------------------------


def plain_text(text: str | None) -> str | None:
    """``text`` without reST markup (``x`` and :role:`x` → x), for ``--help``."""
    if text is None:
        return None
    text = re.sub(r":[a-z]+:`([^`]*)`", r"\1", text)
    return re.sub(r"`{1,2}([^`]*)`{1,2}", r"\1", text)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default (``default: X``; ``required`` for required options); flags
    need none. Help texts that already say ``default`` (or when it is required) keep their own wording. No reST
    backticks. Multi-line descriptions (docstrings) keep their line breaks; one-paragraph ones are wrapped."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = plain_text(action.help or "") or ""
        if action.help is argparse.SUPPRESS or not action.option_strings:
            return text
        if action.required:
            return text if "required" in text else f"{text} (required)".strip()
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction,
                               argparse._VersionAction)) or "default" in text or "required" in text:
            return text
        default = action.default
        if default is None:
            shown = "none"
        elif isinstance(default, (list, tuple)):
            shown = " ".join(map(str, default)) or "none"
        else:
            shown = str(default)
        return f"{text} (default: {shown})".strip()

    def _format_text(self, text: str) -> str:
        return super()._format_text(plain_text(text) or "")

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text.strip():  # a docstring: keep its line breaks
            return super()._fill_text(text, width, indent)
        return argparse.HelpFormatter._fill_text(self, text, width, indent)  # one paragraph: wrap it


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are ``UsageError`` (one line, exit status 2 via ``command``), with
    defaults shown in ``--help`` (``HelpFormatter``) and a ``--debug`` flag."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        if kwargs.get("description"):
            kwargs["description"] = plain_text(kwargs["description"])
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help="show the full traceback of errors")

    def error(self, message: str):  # argparse calls this for bad arguments
        raise UsageError(f"{message} (see {self.prog} --help)")


# argparse `type=` converters: the message names the value and the accepted range


def _number(text: str, cast):
    try:
        value = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if cast is int else 'a number'}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 1")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 0")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number > 0")
    return value


def keep_ratio(text: str) -> float:
    """A keep ratio: a number in (0, 1]."""
    value = _number(text, float)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a keep ratio in (0, 1]")
    return value


def doc_limit(text: str) -> int | float:
    """``--limit``: a count (an integer >= 1) or a share of the docs (a number in (0, 1))."""
    value = _number(text, float)
    if 0 < value < 1:
        return value
    if value >= 1 and value == int(value):
        return int(value)
    raise argparse.ArgumentTypeError(f"{text!r}: expected a number of docs (an integer >= 1) or a share in (0, 1)")


# ---------------------------------------------------------------------------------------------
# vlmkit
# ---------------------------------------------------------------------------------------------


def _top_parser() -> argparse.ArgumentParser:
    from . import __version__

    width = max(map(len, COMMANDS))
    epilog = "commands:\n" + "\n".join(f"  {k:{width}s}  {v[1]}" for k, v in COMMANDS.items())
    epilog += "\n\nvlmkit COMMAND --help shows a command's options. --debug (or VLMKIT_DEBUG=1) shows tracebacks."
    parser = argparse.ArgumentParser(prog="vlmkit", description="vlmkit: extend Hugging Face VLMs",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog)
    parser.add_argument("--version", action="version", version=f"vlmkit {__version__}")
    parser.add_argument("command", metavar="COMMAND", help="one of: " + ", ".join(COMMANDS))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = argv[:1] == ["--debug"]
    if debug:  # `vlmkit --debug eval ...` = `vlmkit eval ... --debug`
        argv = argv[1:]
    parser = _top_parser()
    if not argv:
        parser.print_help(sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] == "--version":
        from . import __version__

        print(f"vlmkit {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"vlmkit: error: unknown command {argv[0]!r}; expected one of: {', '.join(COMMANDS)} "
              "(see vlmkit --help)", file=sys.stderr)
        raise SystemExit(2)
    module, func = COMMANDS[argv[0]][0].split(":")
    return int(getattr(importlib.import_module(module), func)(argv[1:] + (["--debug"] if debug else [])) or 0)


if __name__ == "__main__":
    sys.exit(main())
