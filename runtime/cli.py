"""Pieces shared by the command lines (`python -m runtime`, `export/build_engines.py`); torch-free, so
`--help`, `--version` and argument errors answer at once."""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import re
import sys
import time
from pathlib import Path
from typing import Iterator, TextIO


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends a flag's default once: not for flags without one (None, store_true, an empty append
    list), nor where the help text already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        unset = action.default is None or action.default is False or action.default == []
        if unset or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def version() -> str:
    """The installed package's version, else (a checkout run without installing) pyproject's."""
    try:
        return importlib.metadata.version("nova-runtime")
    except importlib.metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        found = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.M) if pyproject.is_file() else None
        return found.group(1) if found else "unknown"


def add_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=f"nova-runtime {version()}",
                        help="print the version and exit")


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


class ProgressLines:
    """A stderr for progress bars that are not on a terminal: each redraw of a bar (tqdm rewrites its line
    after a carriage return) becomes a plain line, the first at once and then at most one every `interval`
    seconds, so a log shows that work goes on without filling up; other text passes through."""

    def __init__(self, stream: TextIO, interval: float = 5.0):
        self.stream, self.interval, self._last = stream, interval, None

    def write(self, text: str) -> int:
        if not text.startswith("\r"):
            return self.stream.write(text)
        status, now = text.strip(), time.monotonic()
        if status and (self._last is None or now - self._last >= self.interval):
            self.stream.write(status + "\n")
            self._last = now
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str):  # encoding, isatty, ...: the stream's
        return getattr(self.stream, name)


@contextlib.contextmanager
def progress_stream(interval: float = 5.0) -> Iterator[TextIO]:
    """Where progress bars should draw: stderr itself on a terminal, else stderr as `ProgressLines`."""
    yield sys.stderr if sys.stderr.isatty() else ProgressLines(sys.stderr, interval)
