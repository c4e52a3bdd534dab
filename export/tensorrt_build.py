"""TensorRT engines from the exported ONNX graphs (TensorRT 10.x and 11.x, one code path).

- strongly typed networks: the ONNX dtypes are the precision (the STRONGLY_TYPED creation flag is
  required on 10.x and accepted-but-ignored on 11.x, so it is always set);
- path-based parsing (`parse_from_file`), so `<name>.onnx.data` external weights resolve;
- one optimization profile with min/opt/max for every dynamic dim of the declaration;
- a timing cache persisted beside the engines (`timing.cache`, written atomically);
- a workspace memory-pool limit and a builder optimization level;
- a progress monitor (IProgressMonitor) that reports the builder's phases;
- TF32 is disabled for fp32 builds (parity) and left on otherwise (fp32 islands, VAEs).

Nothing here imports TensorRT at module import time: `available()` says whether it can be used,
and every entry point raises `TensorRTUnavailable` (one sentence) where it cannot.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from export.manifest import atomic_write_bytes

if TYPE_CHECKING:  # torch-free at import: build_engines.py checks TensorRT before importing torch
    from runtime.graphs.contract import GraphSpec

TIMING_CACHE_NAME = "timing.cache"


class TensorRTUnavailable(RuntimeError):
    """TensorRT cannot be imported (or has no GPU) on this machine."""


class EngineBuildError(RuntimeError):
    """TensorRT failed to parse or build a graph."""


def available() -> tuple[bool, str]:
    """(True, version) where `import tensorrt` works, else (False, the reason in words)."""
    try:
        import tensorrt as trt  # noqa: F401
    except Exception as error:  # ImportError, or a broken install raising OSError on its libraries
        return False, f"import tensorrt failed: {type(error).__name__}: {error}"
    return True, trt.__version__


def require() -> str:
    """TensorRT's version; `TensorRTUnavailable` (one sentence) where it cannot be imported. torch-free, so that a
    build asking for TensorRT on a machine without it is refused before the heavy imports."""
    ok, detail = available()
    if not ok:
        raise TensorRTUnavailable(unavailable_sentence(detail))
    return detail


def unavailable_sentence(reason: str) -> str:
    return (f"TensorRT is not available on this machine ({reason}), so no TensorRT engines can be built; "
            "install TensorRT 10.x or 11.x on a GPU machine, or build ONNX Runtime artifacts with "
            "--backend onnxruntime.")


def gpu_compute_capability() -> str:
    """'major.minor' of GPU 0, via cuda-python 13.x or torch; raises TensorRTUnavailable without a GPU."""
    try:
        from cuda.bindings import runtime

        err, props = runtime.cudaGetDeviceProperties(0)
        if int(err) == 0:
            return f"{props.major}.{props.minor}"
    except Exception:  # noqa: BLE001 (not installed, or no driver)
        pass
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return f"{major}.{minor}"
    except Exception:  # noqa: BLE001
        pass
    raise TensorRTUnavailable("no CUDA GPU is visible (cuda-python and torch.cuda found none)")


def version_major(version: str) -> int:
    return int(version.split(".")[0])


def _profile_shapes(spec: GraphSpec) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """min/opt/max shape of every input that has a dynamic dim."""
    shapes = {}
    for t in spec.inputs:
        if t.dynamic_axes:
            shapes[t.name] = tuple(t.concrete(spec.dims_at(point)) for point in ("min", "opt", "max"))
    return shapes


def engine_flags(spec: GraphSpec, build_precision: str, workspace_gib: float, opt_level: int) -> dict[str, Any]:
    """What goes into an engine's content key besides ONNX, TensorRT version and GPU."""
    return {"strongly_typed": True, "tf32": build_precision != "fp32", "workspace_gib": workspace_gib,
            "optimization_level": opt_level,
            "profile": {k: [list(s) for s in v] for k, v in _profile_shapes(spec).items()}}


def _monitor_class(trt, report: Callable[[str], None]):
    class ProgressMonitor(trt.IProgressMonitor):
        """Reports the builder's top-level phases with their step counts."""

        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.started: dict[str, float] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.started[phase_name] = time.perf_counter()
            if parent_phase is None:
                report(f"{phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            start = self.started.pop(phase_name, None)
            if start is not None and not self.started:
                report(f"{phase_name} done in {time.perf_counter() - start:.1f} s")

    return ProgressMonitor


def build_engine(spec: GraphSpec, onnx_path: Path, plan_path: Path, timing_cache: Path, build_precision: str,
                 workspace_gib: float = 8.0, opt_level: int = 3,
                 report: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Parse `onnx_path`, build a strongly typed engine, write `plan_path` atomically. -> info."""
    version = require()
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)  # required on 10.x, ignored on 11.x
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT could not parse {onnx_path.name}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    config.builder_optimization_level = opt_level
    if build_precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    config.progress_monitor = _monitor_class(trt, report)()

    shapes = _profile_shapes(spec)
    if shapes:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)

    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):  # corrupt, other GPU or version
        report(f"{timing_cache.name} does not fit this GPU and TensorRT version: starting a new one")
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT failed to build an engine from {onnx_path.name} (see the log above)")
    seconds = time.perf_counter() - start
    atomic_write_bytes(plan_path, bytes(serialized))
    cache = config.get_timing_cache()
    if cache is not None:
        atomic_write_bytes(timing_cache, bytes(cache.serialize()))
    return {"tensorrt": version, "build_seconds": round(seconds, 3)}


def check_engine_loads(plan_path: Path) -> None:
    """Deserialize a plan (TensorRT refuses plans of another version or GPU): EngineBuildError if not."""
    import tensorrt as trt

    runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
    engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
    if engine is None:
        raise EngineBuildError(f"{plan_path.name} does not load with TensorRT {trt.__version__} on this GPU")


def run_engine(plan_path: Path, spec: GraphSpec, inputs: dict[str, Any]) -> list[Any]:
    """Run a plan once on named numpy inputs with torch CUDA buffers. -> numpy outputs in declaration order."""
    import numpy as np
    import tensorrt as trt
    import torch

    runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
    engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
    if engine is None:
        raise EngineBuildError(f"{plan_path.name} does not load with TensorRT {trt.__version__} on this GPU")
    context = engine.create_execution_context()
    keep = []
    for t in spec.inputs:
        tensor = torch.from_numpy(np.ascontiguousarray(inputs[t.name])).cuda()
        context.set_input_shape(t.name, tuple(tensor.shape))
        context.set_tensor_address(t.name, tensor.data_ptr())
        keep.append(tensor)
    outputs = []
    for t in spec.outputs:
        tensor = torch.empty(tuple(context.get_tensor_shape(t.name)), dtype=t.torch_dtype, device="cuda")
        context.set_tensor_address(t.name, tensor.data_ptr())
        outputs.append(tensor)
    stream = torch.cuda.Stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise EngineBuildError(f"{plan_path.name}: execute_async_v3 failed")
    stream.synchronize()
    return [o.float().cpu().numpy() if o.dtype == torch.bfloat16 else o.cpu().numpy() for o in outputs]
