"""A checkpoint's configs, scheduler and tokenizer files: everything but the weights (torch-free).

The runner needs these besides its graphs. `export/build_engines.py` copies them into the engine
folder (`configs/`, same layout as the checkpoint), so a deployment needs neither the checkpoint nor
torch: `CheckpointConfigs.read` reads a checkpoint folder and such a copy alike.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from runtime.model.config import NOVAConfig

COMPONENTS = ("transformer", "text_encoder", "tokenizer", "vae", "scheduler")
CONFIG_FILES = ("model_index.json", "transformer/config.json", "text_encoder/config.json", "vae/config.json",
                "scheduler/scheduler_config.json")  # plus every file of tokenizer/


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, malformed or does not match its configs."""


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"missing file {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None


def model_index(folder: str | os.PathLike) -> dict[str, Any]:
    root = Path(folder)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint folder {root} does not exist")
    index = read_json(root / "model_index.json")
    missing = [c for c in COMPONENTS if c not in index]
    if missing:
        raise CheckpointError(f"{root / 'model_index.json'} has no {', '.join(map(repr, missing))} entry")
    missing = [c for c in COMPONENTS if not (root / c).is_dir()]
    if missing:
        raise CheckpointError(f"checkpoint folder {root} has no {', '.join(c + '/' for c in missing)} subfolder")
    return index


def transformer_config(folder: str | os.PathLike) -> NOVAConfig:
    path = Path(folder) / "transformer" / "config.json"
    try:
        return NOVAConfig.from_dict(read_json(path))
    except (TypeError, ValueError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"{path}: {error}") from None


def config_files(folder: str | os.PathLike) -> list[str]:
    """The non-weight files of a checkpoint, relative to it (what an engine folder carries)."""
    root = Path(folder)
    model_index(root)
    missing = [f for f in CONFIG_FILES if not (root / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint folder {root} has no {', '.join(missing)}")
    tokenizer = sorted(p.relative_to(root).as_posix() for p in (root / "tokenizer").iterdir() if p.is_file())
    return list(CONFIG_FILES) + tokenizer


@dataclasses.dataclass(frozen=True)
class CheckpointConfigs:
    """What the runner reads from a checkpoint (or an engine folder's copy): no weights."""

    folder: Path
    transformer: NOVAConfig
    text_encoder: dict[str, Any]
    vae: dict[str, Any]
    scheduler: dict[str, Any]

    @classmethod
    def read(cls, folder: str | os.PathLike) -> "CheckpointConfigs":
        from runtime.schedules import scheduler_config

        root = Path(folder)
        model_index(root)
        return cls(root, transformer_config(root), read_json(root / "text_encoder" / "config.json"),
                   read_json(root / "vae" / "config.json"), scheduler_config(root / "scheduler"))

    @property
    def video_vae(self) -> bool:
        return self.vae.get("_class_name") == "AutoencoderKLOpenSora"

    @property
    def tokenizer(self) -> Path:
        return self.folder / "tokenizer"
