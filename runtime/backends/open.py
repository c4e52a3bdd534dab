"""Opening a build for the runner: the backend over an engine folder or a checkpoint, with its configs,
profile and graph declarations. Only the chosen backend's library is imported."""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

from runtime.backends import BACKENDS, Backend, BackendUnavailable
from runtime.configs import CheckpointConfigs, CheckpointError
from runtime.engine_folder import EngineFolder, ManifestError
from runtime.graphs.profile import BuildProfile


class OpenedBuild(NamedTuple):
    """What `NOVARunner` is made of."""

    backend: Backend
    configs: CheckpointConfigs
    profile: BuildProfile
    graphs: dict[str, dict]  # each graph's declaration (`GraphSpec.describe()`)


def open_checkpoint(folder: str | Path, profile: BuildProfile | None, precision: str, device: str,
                    compile: bool = False) -> OpenedBuild:
    """The torch backend straight from a checkpoint folder (no export): the graphs' own modules (with `compile`,
    the per-step ones through torch.compile)."""
    check_device(device)
    configs, profile = CheckpointConfigs.read(folder), profile or BuildProfile()
    backend = _unavailable_is_value_error(_torch_backend, configs, profile, precision, None, "onnxruntime", device,
                                          compile)
    return OpenedBuild(backend, configs, profile, {name: spec.describe() for name, spec in backend.specs.items()})


def open_engines(folder: str | Path, backend: str = "auto", device: str | None = None,
                 compile: bool = False) -> OpenedBuild:
    """An engine folder, verified against its manifest, on `backend` ("auto": TensorRT if the folder has
    plans, TensorRT is importable and the device is not "cpu"; else ONNX Runtime) and `device` (by
    default "cuda" for TensorRT, "cpu" for the others); `compile`: the torch backend's per-step graphs through
    torch.compile."""
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend must be one of auto, {', '.join(BACKENDS)}; got {backend!r}")
    if compile and backend != "torch":
        raise ValueError(f"compile=True needs backend='torch' (torch.compile runs the graphs' PyTorch modules), "
                         f"got backend={backend!r}")
    if device is not None:
        check_device(device)
    if backend == "auto":
        on_gpu = device is None or device.startswith("cuda")
        backend = "tensorrt" if on_gpu and EngineFolder.has_plans(folder) and _tensorrt_importable() else "onnxruntime"
    device = device or ("cuda" if backend == "tensorrt" else "cpu")
    try:
        engines = EngineFolder.open(folder, engines=backend == "tensorrt")
        configs = CheckpointConfigs.read(engines.configs_path)
    except (ManifestError, CheckpointError) as error:
        raise ValueError(str(error)) from None
    manifest, profile = engines.manifest, BuildProfile(**engines.manifest["profile"])
    opened = _unavailable_is_value_error(_engine_backend, backend, engines, profile, device, compile)
    return OpenedBuild(opened, configs, profile, {name: engines.declaration(name) for name in engines.graphs})


def check_device(device) -> None:
    if not isinstance(device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def _engine_backend(backend: str, engines: EngineFolder, profile: BuildProfile, device: str,
                    compile: bool = False) -> Backend:
    manifest = engines.manifest
    if backend == "torch":
        return _torch_backend(_built_checkpoint(manifest), profile, manifest["precision"],
                              manifest["overrides"] or None, manifest["backend"], device, compile)
    if backend == "onnxruntime":
        from runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend({name: engines.onnx_path(name) for name in engines.graphs}, device,
                                  tf32=manifest["precision"] != "fp32")
    from runtime.backends.tensorrt_backend import TensorRTBackend

    return TensorRTBackend({name: engines.plan_path(name) for name in engines.graphs}, device)


def _unavailable_is_value_error(make, *args) -> Backend:
    """A backend whose library or device is missing is a bad request here: one sentence, no traceback."""
    try:
        return make(*args)
    except BackendUnavailable as error:
        raise ValueError(str(error)) from None


def _torch_backend(configs: CheckpointConfigs, profile: BuildProfile, precision: str, overrides: dict | None,
                   built_for: str, device: str, compile: bool = False) -> Backend:
    """The graphs' torch modules with the checkpoint's weights."""
    from runtime.backends.torch_backend import TorchBackend
    from runtime.graphs.specs import build_specs

    return TorchBackend(build_specs(configs, profile, precision, overrides, built_for), device, compile=compile)


def _built_checkpoint(manifest: dict) -> CheckpointConfigs:
    """The checkpoint an engine folder was built from (the torch backend reads its weights)."""
    source = Path(manifest["checkpoint"]["path"])
    if not (source / "model_index.json").is_file():
        raise ValueError(f"the torch backend reads weights from the checkpoint the engines were built from, {source}, "
                         f"which is not there (the tensorrt and onnxruntime backends do not need it)")
    return CheckpointConfigs.read(source)


def _tensorrt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True
