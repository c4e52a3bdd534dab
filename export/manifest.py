"""The build side of an engine folder's manifest: content keys and atomic writes.

Reading and verifying a folder is `runtime/engine_folder.py` (the runner uses it without any build
code). `manifest.json` records, per component (graph): its content key and the parts it hashes, the
artifact files with their size and sha256, the declared I/O, the precision, the validation report
and, for TensorRT, the engine with its own key. The manifest carries a checksum of its own content;
every write is atomic (temporary file + rename).

Content key of a graph's ONNX artifact = sha256 over
    weights    the tensors of its checkpoint component that the graph uses (+ that component's config)
    code       the repository files that define and export it: the graph's module, the exporter and all
               they import (read from the source, `runtime.sources`)
    graph      its declaration: I/O names, dtypes, shapes (= the build profile as it affects this graph)
    precision  its compute precision
    toolchain  torch / onnx / onnxscript (+ transformers or diffusers) versions, exporter and opset
    validation ONNX Runtime version and the tolerances it was checked with
An engine's key hashes the ONNX files, the optimization profile, the TensorRT version, the GPU's
compute capability and the builder flags.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any, Iterable

from runtime.engine_folder import (CONFIGS_DIR, FORMAT, MANIFEST_NAME, ManifestError, check_artifacts,  # noqa: F401
                                   digest, load_manifest, sha256_file)

WEIGHT_CACHE_NAME = ".weight-digests.json"  # speed only: per-tensor digests keyed by file size + mtime


# -------------------------------------------------------------------------------------------------
# Hashing
# -------------------------------------------------------------------------------------------------
def source_digest(root: Path, paths: Iterable[str]) -> str:
    """Digest of the named repository files' contents (the export code version)."""
    h = hashlib.sha256()
    for rel in sorted(set(paths)):
        h.update(rel.encode() + b"\0")
        file = root / rel
        h.update(file.read_bytes() if file.exists() else b"<missing>")
        h.update(b"\0")
    return h.hexdigest()


def _safetensors_digests(path: Path) -> dict[str, str]:
    """Per-tensor sha256 of a safetensors file (dtype + shape + bytes), reading the header ourselves."""
    with open(path, "rb") as handle:
        try:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
        except (struct.error, ValueError) as error:
            raise ManifestError(f"{path} is not a readable safetensors file ({error})") from None
        base = 8 + size
        out = {}
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        for key, info in sorted(tensors.items(), key=lambda kv: kv[1]["data_offsets"][0]):  # sequential reads
            begin, end = info["data_offsets"]
            handle.seek(base + begin)
            h = hashlib.sha256(f"{info['dtype']}{info['shape']}".encode())
            remaining = end - begin
            while remaining:
                block = handle.read(min(remaining, 16 << 20))
                if not block:
                    raise ManifestError(f"{path} is truncated (tensor {key})")
                h.update(block)
                remaining -= len(block)
            out[key] = h.hexdigest()
    return out


class WeightDigests:
    """Per-tensor digests of checkpoint weight files, cached by (path, size, mtime) in `cache_file`."""

    def __init__(self, cache_file: Path | None = None):
        self.cache_file = cache_file
        self.cache: dict[str, Any] = {}
        if cache_file and cache_file.is_file():
            try:
                self.cache = json.loads(cache_file.read_text())
            except (OSError, json.JSONDecodeError):
                self.cache = {}
        self.dirty = False

    def file(self, path: Path) -> dict[str, str]:
        stat = path.stat()
        key = str(path.resolve())
        entry = self.cache.get(key)
        if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
            return entry["tensors"]
        tensors = _safetensors_digests(path)
        self.cache[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "tensors": tensors}
        self.dirty = True
        return tensors

    def component(self, folder: Path, prefixes: tuple[str, ...]) -> str:
        """Digest of the tensors of one checkpoint component whose names start with one of `prefixes`."""
        from runtime.checkpoint import weight_files

        selected = {}
        for path in weight_files(folder):
            for key, value in self.file(path).items():
                if not prefixes or any(key.startswith(p) for p in prefixes):
                    selected[key] = value
        return digest(selected)

    def save(self) -> None:
        if self.cache_file and self.dirty:
            atomic_write_text(self.cache_file, json.dumps(self.cache))
            self.dirty = False


# -------------------------------------------------------------------------------------------------
# Files
# -------------------------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def artifact_record(path: Path, folder: Path) -> dict[str, Any]:
    return {"file": str(path.relative_to(folder)), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


# -------------------------------------------------------------------------------------------------
# The manifest
# -------------------------------------------------------------------------------------------------
def save_manifest(folder: str | os.PathLike, manifest: dict[str, Any]) -> None:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    body["format"] = FORMAT
    atomic_write_text(Path(folder) / MANIFEST_NAME, json.dumps({**body, "checksum": digest(body)}, indent=2) + "\n")


PART_LABELS = {
    "weights": "checkpoint weights changed",
    "code": "export code changed",
    "graph": "graph declaration (shapes/profile) changed",
    "precision": "precision changed",
    "toolchain": "exporter toolchain changed",
    "validation": "validation settings changed",
    "onnx": "ONNX graph changed",
    "profile": "optimization profile changed",
    "tensorrt": "TensorRT version changed",
    "gpu": "GPU compute capability changed",
    "flags": "builder flags changed",
}


def changed_parts(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human reasons for why two key-part tables differ."""
    reasons = []
    for part in sorted(set(old) | set(new)):
        if old.get(part) != new.get(part):
            label = PART_LABELS.get(part, f"{part} changed")
            if part in ("tensorrt", "gpu") and isinstance(old.get(part), str):
                label += f" ({old.get(part)} -> {new.get(part)})"
            reasons.append(label)
    return reasons
