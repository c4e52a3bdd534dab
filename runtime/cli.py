"""Pieces shared by the command lines (`python -m runtime`, `export/build_engines.py`); torch-free, so
`--help`, `--version` and argument errors answer at once."""

from __future__ import annotations

import argparse
import importlib.metadata
import re
from pathlib import Path


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
