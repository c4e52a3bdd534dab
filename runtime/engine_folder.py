"""An engine folder, as `export/build_engines.py` writes it and the runner reads it.

    manifest.json      what was built: per graph its declaration, artifacts (file, size, sha256),
                       content key and validation; the build profile, precision and checkpoint
    configs/           the checkpoint's configs, scheduler and tokenizer (the runner reads them here)
    <graph>.onnx(.data), <graph>.plan

The manifest carries a checksum of its own content and a format version. The format is the one
"built by another version" check: it changes whenever the manifest's layout, or anything the runner
derives from it (profile fields, geometry, graph conventions), changes. The build side (content keys,
writing) is `export/manifest.py`; this module only reads and verifies, so a deployment needs no
build code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
CONFIGS_DIR = "configs"
FORMAT = 6  # 3: BuildProfile.diffusion_steps and the denoise_loop graph; 4: guidance per diffusion step;
# 5: guidance row blocks (Geometry.blocks) and the third-pass inputs; 6: BuildProfile.guidance_renorm (the
# whole-grid denoise_loop)
REBUILD = "rebuild with export/build_engines.py"


class ManifestError(ValueError):
    """A manifest or an artifact it lists is unreadable, edited, or does not match."""


class ManifestFormatError(ManifestError):
    """A manifest written by another version of this runtime (another FORMAT)."""


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def digest(obj: Any) -> str:
    return hashlib.sha256(canonical(obj)).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_artifacts(records: list[dict[str, Any]], folder: Path) -> str | None:
    """None when every listed file exists with its recorded size and sha256, else the first problem."""
    for record in records:
        path = folder / record["file"]
        if not path.is_file():
            return f"{record['file']} is missing"
        if path.stat().st_size != record["bytes"]:
            return f"{record['file']} was modified after the build (size {path.stat().st_size}, recorded {record['bytes']})"
        if sha256_file(path) != record["sha256"]:
            return f"{record['file']} was modified after the build (sha256 mismatch)"
    return None


def load_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of an engine folder; None if there is none; ManifestError if it is corrupt or of
    another format."""
    path = Path(folder) / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ManifestError(f"{path} is not valid JSON ({error}); it was damaged or edited by hand") from None
    if not isinstance(manifest, dict) or "checksum" not in manifest:
        raise ManifestError(f"{path} is not a manifest written by export/build_engines.py")
    if manifest.get("format") != FORMAT:
        raise ManifestFormatError(f"{path} was written by another version of this runtime (format {manifest.get('format')}, "
                            f"this version reads format {FORMAT}); {REBUILD}")
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    if digest(body) != manifest["checksum"]:
        raise ManifestError(f"{path} was edited after the build (its checksum does not match its content)")
    return manifest


@dataclasses.dataclass(frozen=True)
class EngineFolder:
    """A verified engine folder: every artifact the chosen backend reads has its recorded size and sha256."""

    path: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, folder: str | os.PathLike, engines: bool = False) -> "EngineFolder":
        """Load and verify; `engines`: also every graph's TensorRT plan. Raises ManifestError saying what to do."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ManifestError(f"engine folder {folder} {'is a file' if folder.exists() else 'does not exist'}: give the "
                                f"folder written by `python export/build_engines.py --checkpoint CKPT --out FOLDER`")
        manifest = load_manifest(folder)
        if manifest is None:
            raise ManifestError(f"{folder} has no {MANIFEST_NAME}, so it is not an engine folder: build one with "
                                f"`python export/build_engines.py --checkpoint CKPT --out FOLDER`")
        missing = [name for name in manifest["graph_order"] if name not in manifest["components"]]
        missing += [f"{CONFIGS_DIR}/"] if not manifest["configs"] else []
        if missing:
            raise ManifestError(f"{folder} is a partial build (no {', '.join(missing)}): the build did not finish; "
                                f"{REBUILD}")
        problem = check_artifacts(manifest["configs"], folder)
        if problem:
            raise ManifestError(f"{folder}: {problem}; {REBUILD}")
        for name in manifest["graph_order"]:
            entry = manifest["components"][name]
            if engines and not entry.get("engine"):
                raise ManifestError(f"{folder}: graph {name} has no TensorRT engine; rebuild with --backend tensorrt "
                                    f"on a machine with TensorRT and a GPU")
            problem = check_artifacts(entry["artifacts"] + (entry["engine"]["artifacts"] if engines else []), folder)
            if problem:
                raise ManifestError(f"{folder}: graph {name}: {problem}; {REBUILD}")
        return cls(folder, manifest)

    @property
    def graphs(self) -> list[str]:
        """The graph names, in build order."""
        return list(self.manifest["graph_order"])

    def declaration(self, graph: str) -> dict[str, Any]:
        """The graph's declaration (`GraphSpec.describe()`): I/O names, dtypes, shapes, precision."""
        return self.manifest["components"][graph]["declaration"]

    def onnx_path(self, graph: str) -> Path:
        return self._artifact(self.manifest["components"][graph]["artifacts"], ".onnx")

    def plan_path(self, graph: str) -> Path:
        return self._artifact(self.manifest["components"][graph]["engine"]["artifacts"], ".plan")

    def _artifact(self, records: list[dict[str, Any]], suffix: str) -> Path:
        return self.path / next(r["file"] for r in records if r["file"].endswith(suffix))

    @property
    def configs_path(self) -> Path:
        return self.path / CONFIGS_DIR

    @staticmethod
    def has_plans(folder: str | os.PathLike) -> bool:
        """Whether a folder holds TensorRT plans (read before choosing a backend, so before verifying)."""
        return any(Path(folder).glob("*.plan"))
