"""A checkpoint's configs, scheduler and tokenizer files: everything but the weights (torch-free).

`CheckpointConfigs` is the one reader of a checkpoint folder's configs: the runner, the graph
declarations and the build all use it (weights are loaded by `runtime.checkpoint`).
`export/build_engines.py` copies these files into the engine folder (`configs/`, same layout as the
checkpoint), so a deployment needs neither the checkpoint nor torch: `CheckpointConfigs.read` reads a
checkpoint folder and such a copy alike.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

from runtime.files import CheckpointError, read_json
from runtime.model.config import NOVAConfig
from runtime.schedules import checked_config

COMPONENTS = ("transformer", "text_encoder", "tokenizer", "vae", "scheduler")
CONFIG_FILES = ("model_index.json", "transformer/config.json", "text_encoder/config.json", "vae/config.json",
                "scheduler/scheduler_config.json")  # plus every file of tokenizer/


__all__ = ["CheckpointConfigs", "CheckpointError", "config_files", "is_video_vae", "model_index", "read_json",
           "scheduler_config", "transformer_config"]


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


def scheduler_config(folder: str | os.PathLike) -> dict[str, Any]:
    """`scheduler_config.json` of folder, checked and completed by `checked_config` (no torch, no diffusers)."""
    path = Path(folder) / "scheduler_config.json"
    return checked_config(read_json(path), str(path))


def is_video_vae(vae_config: Mapping[str, Any]) -> bool:
    """Whether a VAE config (a checkpoint's vae/config.json, or a loaded VAE's `.config`) is the
    Open-Sora-Plan causal video VAE rather than an image VAE."""
    return vae_config.get("_class_name") == "AutoencoderKLOpenSora"


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
        root = Path(folder)
        model_index(root)
        return cls(root, transformer_config(root), read_json(root / "text_encoder" / "config.json"),
                   read_json(root / "vae" / "config.json"), scheduler_config(root / "scheduler"))

    @property
    def name(self) -> str:
        return self.folder.resolve().name

    @property
    def video_vae(self) -> bool:
        return is_video_vae(self.vae)

    def component_config(self, component: str | None) -> dict[str, Any]:
        """The config of a weight-holding component (what a graph's weights key hashes); {} for none."""
        return {"transformer": self.transformer.to_dict(), "text_encoder": self.text_encoder, "vae": self.vae,
                None: {}}[component]

    @property
    def tokenizer(self) -> Path:
        return self.folder / "tokenizer"
