"""The build: export every graph, validate it, build engines, keep the manifest (see build_engines.py).

For each graph of `runtime.graphs.build_specs(...)`, in order:

1. compute its content key (export/manifest.py); if the manifest has the same key and every
   artifact still has its recorded sha256, reuse it;
2. otherwise export it into a staging folder, run it in ONNX Runtime against its torch module
   (and, for the temporal step, across several frames with the cache carried), and only then move
   the files into place and record them in the manifest (written atomically after each graph, so
   an interrupted build keeps what it finished and leaves nothing that looks valid but is not);
3. with the TensorRT backend, build (or reuse) the engine from the ONNX file, keyed by the ONNX
   content, profile, TensorRT version and GPU.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from export import manifest as mf
from export.onnx_export import DEFAULT_EXPORTER, OPSET, export_forms, export_graph
from export.validate import (TOLERANCES, NotRunnable, ValidationError, compare_cases, ort_session, reference_cases,
                             temporal_sequence)
from runtime.checkpoint import check_weights
from runtime.configs import CheckpointConfigs, CheckpointError, config_files
from runtime.engine_folder import ManifestFormatError
from runtime.graphs.common import ModuleCache
from runtime.graphs.contract import GraphSpec
from runtime.graphs.profile import POLICY_REASONS, BuildProfile, Geometry
from runtime.graphs.specs import build_specs
from runtime.sources import reachable_files
from runtime.tokenizer import PromptTokenizer

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("auto", "tensorrt", "onnxruntime")
# the code each step runs, read from the imports (`runtime.sources`)
EXPORT_SOURCES = reachable_files("export.onnx_export")
VALIDATION_SOURCES = reachable_files("export.validate")
ENGINE_SOURCES = reachable_files("export.tensorrt_build")


class BuildError(RuntimeError):
    """The build cannot go on; the message says why in one or two sentences."""


@dataclasses.dataclass
class BuildOptions:
    checkpoint: Path
    out: Path
    precision: str = "fp16"
    backend: str = "auto"
    profile: BuildProfile = dataclasses.field(default_factory=BuildProfile)
    overrides: dict[str, str] = dataclasses.field(default_factory=dict)
    exporter: str = DEFAULT_EXPORTER
    validate: bool = True
    validate_frames: int = 3
    threads: int = 1
    only: tuple[str, ...] | None = None
    force: bool = False
    workspace_gib: float = 8.0
    opt_level: int = 3
    progress: bool = True


@dataclasses.dataclass
class Row:
    component: str
    artifact: str
    bytes: int
    seconds: float
    status: str  # reused | rebuilt | revalidated | removed
    why: str
    precision: str
    parity: str


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    out = {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    try:
        import onnxscript

        out["onnxscript"] = onnxscript.__version__
    except ImportError:
        pass
    return out


def _library_versions(component: str | None) -> dict[str, str]:
    if component == "text_encoder":
        import transformers

        return {"transformers": transformers.__version__}
    if component == "vae":
        import diffusers

        return {"diffusers": diffusers.__version__}
    return {}


def resolve_backend(requested: str, report: Callable[[str], None]) -> tuple[str, str | None]:
    """-> (backend, TensorRT version or None). One sentence when TensorRT is missing."""
    from export import tensorrt_build

    if requested not in BACKENDS:
        raise BuildError(f"--backend must be one of {', '.join(BACKENDS)}, got {requested!r}")
    if requested == "onnxruntime":
        return "onnxruntime", None
    if requested == "tensorrt":
        try:
            return "tensorrt", tensorrt_build.require()
        except tensorrt_build.TensorRTUnavailable as error:
            raise BuildError(str(error)) from None
    ok, detail = tensorrt_build.available()
    if ok:
        return "tensorrt", detail
    report(f"TensorRT is not available on this machine ({detail}), so this build produces the ONNX graphs and "
           "their ONNX Runtime artifacts only.")
    return "onnxruntime", None


def parity_summary(validation: dict[str, Any] | None) -> str:
    """Worst max abs error and cosine against the torch module (16-bit graphs: also against fp32)."""
    if not validation:
        return "not validated"
    if validation.get("passed") is None:
        return f"not run (no {validation.get('precision', '')} kernels)".replace("no  ", "no ")
    outputs = validation["outputs"].values()
    text = f"max {max(e['max_abs'] for e in outputs):.1e} cos {min(e['cosine'] for e in outputs):.6f}"
    anchored = [e["vs_fp32"]["max_abs"] for e in outputs if "vs_fp32" in e]
    return text + (f" (vs fp32 {max(anchored):.1e})" if anchored else "")


class _StageBar:
    """A tqdm bar per graph whose description shows the current stage."""

    def __init__(self, bar, name: str):
        self.bar, self.name = bar, name
        self.set_postfix_str("")

    def set_postfix_str(self, stage: str) -> None:
        self.bar.set_description_str(f"{self.name:<16} {stage:<10}")

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def _check_out_folder(out: Path, checkpoint: Path) -> None:
    """Refuse to write engines into the checkpoint or into a folder that holds something else."""
    if out.resolve() == checkpoint.resolve() or checkpoint.resolve() in out.resolve().parents:
        raise BuildError(f"--out {out} is inside the checkpoint folder {checkpoint}; choose a separate folder")
    if out.exists() and not out.is_dir():
        raise BuildError(f"--out {out} is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / mf.MANIFEST_NAME).exists():
        raise BuildError(f"--out {out} already holds files and no {mf.MANIFEST_NAME} (it is not an engine folder); "
                         f"choose an empty or new folder")


class Builder:
    def __init__(self, options: BuildOptions, report: Callable[[str], None] = print):
        self.options, self.report = options, report
        self.rows: list[Row] = []

    # -- setup ---------------------------------------------------------------------------------------
    def prepare(self) -> None:
        o = self.options
        self.backend, self.trt_version = resolve_backend(o.backend, self.report)
        self.gpu = None
        if self.backend == "tensorrt":
            from export import tensorrt_build

            try:
                self.gpu = tensorrt_build.gpu_compute_capability()
            except tensorrt_build.TensorRTUnavailable as error:
                raise BuildError(f"TensorRT is installed but cannot build engines here: {error}.") from None
        _check_out_folder(o.out, o.checkpoint)
        try:  # everything a graph or the runner will read, before anything is exported
            self.checkpoint = CheckpointConfigs.read(o.checkpoint)
            check_weights(o.checkpoint)
            self.config_files = config_files(o.checkpoint)
            PromptTokenizer.from_folder(o.checkpoint / "tokenizer")
        except (CheckpointError, ValueError) as error:
            raise BuildError(str(error)) from None
        try:
            self.modules = ModuleCache(o.checkpoint)
            self.forms = export_forms(self.backend, o.exporter)
            self.specs = build_specs(self.checkpoint, o.profile, o.precision, o.overrides, self.backend, self.modules,
                                     **self.forms)
            self.geometry = Geometry.from_config(self.checkpoint.transformer, o.profile)
        except ValueError as error:
            raise BuildError(str(error)) from None
        if o.only:
            unknown = sorted(set(o.only) - set(self.specs))
            if unknown:
                raise BuildError(f"no graph named {', '.join(unknown)} in this build (graphs: {', '.join(self.specs)})")
        o.out.mkdir(parents=True, exist_ok=True)
        self.unusable_manifest = None  # why an existing manifest is ignored, if it is
        try:
            self.manifest = mf.load_manifest(o.out)
        except mf.ManifestError as error:
            self.report(f"warning: {error}; ignoring it and rebuilding every component.")
            self.unusable_manifest = "manifest of another version" if isinstance(error, ManifestFormatError) \
                else "manifest was corrupt"
            self.manifest = None
        if self.manifest is None:
            self.manifest = {"components": {}}
        self.weights = mf.WeightDigests(o.out / mf.WEIGHT_CACHE_NAME)
        self.versions = _versions()

    # -- keys ----------------------------------------------------------------------------------------
    def key_parts(self, spec: GraphSpec) -> dict[str, Any]:
        ck, o = self.checkpoint, self.options
        weights = {"config": ck.component_config(spec.component)}
        if spec.component:
            weights["tensors"] = self.weights.component(ck.folder / spec.component, spec.weight_prefixes)
        toolchain = {k: v for k, v in self.versions.items() if k != "onnxruntime"}
        toolchain.update(_library_versions(spec.component), exporter=o.exporter, opset=OPSET)
        return {"weights": mf.digest(weights), "code": mf.source_digest(ROOT, spec.sources + EXPORT_SOURCES),
                "graph": mf.digest({k: v for k, v in spec.describe().items() if k != "precision"}),
                "precision": spec.precision, "toolchain": toolchain}

    def validation_key(self, spec: GraphSpec, artifact_key: str) -> str:
        extra = {"frames": self.options.validate_frames} if spec.name == "temporal_step" else {}
        if spec.name == "temporal_step":  # the multi-frame check also runs the prefill graph
            extra["prefill"] = self.manifest["components"].get("temporal_prefill", {}).get("key")
        return mf.digest({"artifact": artifact_key, "onnxruntime": self.versions["onnxruntime"],
                          "tolerance": dataclasses.asdict(TOLERANCES[spec.precision]),
                          "code": mf.source_digest(ROOT, VALIDATION_SOURCES), **extra})

    def engine_parts(self, spec: GraphSpec, entry: dict[str, Any]) -> dict[str, Any]:
        from export import tensorrt_build

        return {"onnx": [a["sha256"] for a in entry["artifacts"]], "tensorrt": self.trt_version, "gpu": self.gpu,
                "flags": tensorrt_build.engine_flags(spec, self.options.precision, self.options.workspace_gib,
                                                     self.options.opt_level),
                "code": mf.source_digest(ROOT, ENGINE_SOURCES)}

    # -- the build -------------------------------------------------------------------------------------
    def run(self) -> list[Row]:
        from tqdm.auto import tqdm

        self.prepare()
        o = self.options
        names = [n for n in self.specs if not o.only or n in o.only]
        self._remove_stale()
        stages = 3 + (self.backend == "tensorrt")
        for index, name in enumerate(names):
            spec = self.specs[name]
            bar = _StageBar(tqdm(total=stages, unit="stage", leave=True, disable=None if o.progress else True,
                                 bar_format="{desc} {bar:20} {n_fmt}/{total_fmt}"), name)
            quiet = bar.bar.disable  # (tqdm sets disable on close)
            try:
                self._component(spec, bar)
            finally:
                bar.close()
            if quiet:  # no terminal (or --no-progress): one line per graph instead of a bar
                row = self.rows[-1]
                self.report(f"[{index + 1}/{len(names)}] {name}: {row.status} in {row.seconds:.1f} s ({row.why})")
            self._release_after(names[index + 1:])
        self._copy_configs()
        self.weights.save()
        return self.rows

    def _copy_configs(self) -> None:
        """Copy the checkpoint's configs, scheduler and tokenizer into configs/ (the runner reads them
        there, so a deployment needs no checkpoint); replaced as a whole, recorded like an artifact."""
        o, start = self.options, time.perf_counter()
        source, files = self.checkpoint.folder, self.config_files
        wanted = [{"file": f"{mf.CONFIGS_DIR}/{f}", "bytes": (source / f).stat().st_size,
                   "sha256": mf.sha256_file(source / f)} for f in files]
        old = self.manifest.get("configs")
        problem = mf.check_artifacts(old, o.out) if old else (self.unusable_manifest or "not built yet")
        why = problem or ("the checkpoint's configs or tokenizer changed" if old != wanted else "")
        if why:
            staging, target = o.out / f".staging-{mf.CONFIGS_DIR}", o.out / mf.CONFIGS_DIR
            shutil.rmtree(staging, ignore_errors=True)
            for f in files:
                (staging / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source / f, staging / f)
            self.manifest["configs"] = None  # forget the old copy before replacing it
            mf.save_manifest(o.out, self._manifest_body())
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
            self.manifest["configs"] = wanted
            mf.save_manifest(o.out, self._manifest_body())
        self.rows.append(Row(mf.CONFIGS_DIR, f"{mf.CONFIGS_DIR}/", sum(r["bytes"] for r in wanted),
                             time.perf_counter() - start, "rebuilt" if why else "reused",
                             why or "content key unchanged, artifacts verified", "-", "-"))

    def _component(self, spec: GraphSpec, bar) -> None:
        o, components = self.options, self.manifest["components"]
        start = time.perf_counter()
        bar.set_postfix_str("hashing")
        parts = self.key_parts(spec)
        key = mf.digest(parts)
        entry = components.get(spec.name)
        bar.update(1)
        reasons = self._reasons(entry, key, parts)
        status = "reused"
        if reasons:
            status = "rebuilt"
            bar.set_postfix_str("exporting")
            entry = self._rebuild(spec, key, parts, bar)
        else:
            bar.update(1)
            if o.validate and (entry.get("validation") or {}).get("key") != self.validation_key(spec, key):
                bar.set_postfix_str("validating")
                entry["validation"] = self._validate(spec, lambda: self._cases(spec, spec.build()),
                                                     o.out / f"{spec.name}.onnx")
                entry["validation"]["key"] = self.validation_key(spec, key)
                components[spec.name] = entry
                mf.save_manifest(o.out, self._manifest_body())
                status, reasons = "revalidated", [
                    "not validated yet" if not entry.get("validation") else
                    "validation settings, code or ONNX Runtime version changed"]
        bar.update(1)
        if self.backend == "tensorrt":
            bar.set_postfix_str("engine")
            engine_reasons = self._engine(spec, entry)
            if engine_reasons and status == "reused":
                status, reasons = "rebuilt", ["engine: " + r for r in engine_reasons]
            bar.update(1)
        bar.set_postfix_str(status)
        files = entry["artifacts"] + (entry.get("engine") or {}).get("artifacts", [])
        shown = (entry.get("engine") or {}).get("artifacts", entry["artifacts"])[0]["file"] if self.backend == "tensorrt" \
            else entry["artifacts"][0]["file"]
        why = "; ".join(reasons) if reasons else "content key unchanged, artifacts verified"
        self.rows.append(Row(spec.name, shown, sum(a["bytes"] for a in files), time.perf_counter() - start, status, why,
                             self._precision_label(spec), parity_summary(entry.get("validation"))))

    def _reasons(self, entry: dict[str, Any] | None, key: str, parts: dict[str, Any]) -> list[str]:
        if self.options.force:
            return ["--force"]
        if entry is None:
            return [self.unusable_manifest or "not built yet"]
        if entry.get("key") != key:
            return mf.changed_parts(entry.get("parts", {}), parts) or ["content key changed"]
        problem = mf.check_artifacts(entry.get("artifacts", []), self.options.out)
        return [problem] if problem else []

    def _precision_label(self, spec: GraphSpec) -> str:
        label = spec.precision
        if spec.precision != self.options.precision:
            why = POLICY_REASONS.get((self.options.precision, spec.name))
            if spec.name in self.options.overrides:
                why = "--component-precision override"
            elif self.backend == "tensorrt" and spec.name == "text_encoder":
                why = "Phi-2 overflows in fp16; TensorRT runs bf16"
            label += f" ({why})" if why else ""
        return label

    # -- rebuilding one graph --------------------------------------------------------------------------------
    def _rebuild(self, spec: GraphSpec, key: str, parts: dict[str, Any], bar) -> dict[str, Any]:
        o, components = self.options, self.manifest["components"]
        staging = o.out / f".staging-{spec.name}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            module = spec.build()
            onnx_path = staging / f"{spec.name}.onnx"
            info = export_graph(spec, module, onnx_path, exporter=o.exporter)
            bar.update(1)
            bar.set_postfix_str("validating")
            validation = None
            if o.validate:
                if spec.component == "text_encoder":  # Phi-2 is large: free the torch copy before ORT loads its own
                    cases = self._cases(spec, module)
                    module = None
                    self.modules.release("text_encoder")
                    validation = self._validate(spec, lambda: cases, onnx_path)
                else:
                    validation = self._validate(spec, lambda: self._cases(spec, module), onnx_path)
                validation["key"] = self.validation_key(spec, key)
            # Publish: forget the old entry first, then move the files in, then record them.
            if spec.name in components:
                del components[spec.name]
                mf.save_manifest(o.out, self._manifest_body())
            names = [onnx_path.name, onnx_path.name + ".data"]
            for file in names:
                os.replace(staging / file, o.out / file)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        entry = {
            "key": key, "parts": parts, "precision": spec.precision, "declaration": spec.describe(), "doc": spec.doc,
            "artifacts": [mf.artifact_record(o.out / f, o.out) for f in names],
            "export": info, "validation": validation, "engine": None,
            "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        components[spec.name] = entry
        mf.save_manifest(o.out, self._manifest_body())
        return entry

    def fp32_twin(self, spec: GraphSpec) -> GraphSpec | None:
        """The same graph at fp32 (the anchor of 16-bit comparisons), or None for an fp32 graph."""
        if spec.precision == "fp32":
            return None
        o = self.options
        return build_specs(self.checkpoint, o.profile, "fp32", None, self.backend, self.modules,
                           **self.forms)[spec.name]

    def _cases(self, spec: GraphSpec, module, seed: int = 1) -> list[dict[str, Any]]:
        twin = self.fp32_twin(spec)
        return reference_cases(spec, module, seed, fp32_module=twin.build() if twin else None, fp32_spec=twin)

    def _validate(self, spec: GraphSpec, make_cases: Callable[[], list[dict[str, Any]]],
                  onnx_path: Path) -> dict[str, Any]:
        o = self.options
        try:
            session = ort_session(onnx_path, o.threads)
        except NotRunnable as error:
            self.report(f"{spec.name} ({spec.precision}): not validated: {error}; the graph is kept for TensorRT "
                        "and GPU execution providers.")
            return {"passed": None, "skipped": str(error), "precision": spec.precision}
        try:
            report = compare_cases(spec, session, make_cases())
            if spec.name == "temporal_step" and o.validate_frames > 1:
                report["frames"] = self._validate_frames(spec, session)
        except ValidationError as error:
            raise BuildError(f"{error}. The build stops here; nothing was installed for {spec.name}.") from None
        return report

    def _validate_frames(self, step: GraphSpec, step_session) -> dict[str, Any]:
        """Prefill + steps in ONNX Runtime with the cache carried, against the reference KV-cache path."""
        prefill = self.specs["temporal_prefill"]
        prefill_onnx = self.options.out / "temporal_prefill.onnx"
        if not prefill_onnx.exists():
            raise BuildError("the temporal_step check needs temporal_prefill built first (do not use --only "
                             "temporal_step on a fresh folder)")
        prefill_session = ort_session(prefill_onnx, self.options.threads)
        frames = min(self.options.validate_frames, self.geometry.max_latent_length)
        model = self.modules("transformer", step.precision)
        fp32_model = self.modules("transformer", "fp32") if step.precision != "fp32" else None
        return temporal_sequence(
            prefill, step, lambda feed: prefill_session.run(None, feed), lambda feed: step_session.run(None, feed),
            model, self.geometry, frames, fp32_model=fp32_model)

    # -- TensorRT ---------------------------------------------------------------------------------------
    def _engine(self, spec: GraphSpec, entry: dict[str, Any]) -> list[str]:
        from export import tensorrt_build

        o = self.options
        parts = self.engine_parts(spec, entry)
        key = mf.digest(parts)
        engine = entry.get("engine")
        reasons = []
        if o.force:
            reasons = ["--force"]
        elif not engine:
            reasons = ["not built yet"]
        elif engine.get("key") != key:
            reasons = mf.changed_parts(engine.get("parts", {}), parts) or ["engine key changed"]
        else:
            problem = mf.check_artifacts(engine["artifacts"], o.out)
            reasons = [problem] if problem else []
        if not reasons:
            return []
        plan = o.out / f"{spec.name}.plan"
        info = tensorrt_build.build_engine(spec, o.out / f"{spec.name}.onnx", plan, o.out / tensorrt_build.TIMING_CACHE_NAME,
                                           o.precision, o.workspace_gib, o.opt_level,
                                           report=lambda m: self.report(f"{spec.name}: {m}"))
        validation = None
        if o.validate:
            try:
                validation = compare_cases(spec, lambda feed: tensorrt_build.run_engine(plan, spec, feed),
                                           self._cases(spec, spec.build(), seed=11), what="TensorRT")
            except ValidationError as error:
                plan.unlink(missing_ok=True)
                raise BuildError(f"{error}. The build stops here.") from None
        entry["engine"] = {"key": key, "parts": parts, "artifacts": [mf.artifact_record(plan, o.out)], "build": info,
                           "validation": validation}
        self.manifest["components"][spec.name] = entry
        mf.save_manifest(o.out, self._manifest_body())
        return reasons

    # -- bookkeeping ------------------------------------------------------------------------------------
    def _remove_stale(self) -> None:
        """Drop manifest entries (and files) of graphs that are no longer part of this build."""
        components = self.manifest["components"]
        for name in [n for n in components if n not in self.specs]:
            for record in components[name].get("artifacts", []) + ((components[name].get("engine") or {}).get("artifacts") or []):
                (self.options.out / record["file"]).unlink(missing_ok=True)
            del components[name]
            self.rows.append(Row(name, "-", 0, 0.0, "removed", "no longer part of this build", "-", "-"))
            mf.save_manifest(self.options.out, self._manifest_body())

    def _release_after(self, remaining: list[str]) -> None:
        needed = {self.specs[n].component for n in remaining}
        for component in ("transformer", "text_encoder", "vae"):
            if component not in needed:
                self.modules.release(component)

    def _manifest_body(self) -> dict[str, Any]:
        o = self.options
        return {
            "builder": "export/build_engines.py",
            "checkpoint": {"name": self.checkpoint.name, "path": str(self.checkpoint.folder.resolve())},
            "precision": o.precision, "backend": self.backend, "overrides": o.overrides,
            "profile": o.profile.to_dict(), "geometry": self.geometry.to_dict(),
            "tools": {**self.versions, "tensorrt": self.trt_version, "gpu_compute_capability": self.gpu},
            "graph_order": list(self.specs),
            "components": self.manifest["components"],
            "configs": self.manifest.get("configs"),
        }


def build(options: BuildOptions, report: Callable[[str], None] = print) -> list[Row]:
    return Builder(options, report).run()


def format_size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    units = ("KB", "MB", "GB")
    power = min(len(units), int(math.log(size, 1024)))
    return f"{size / 1024 ** power:.1f} {units[power - 1]}"


def format_table(rows: list[Row]) -> str:
    header = ("component", "artifact", "size", "time", "status", "precision", "ORT parity", "why")
    lines = [(r.component, r.artifact, format_size(r.bytes), f"{r.seconds:.1f} s", r.status, r.precision, r.parity,
              r.why) for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, lines)])
