"""Exported ONNX graphs in ONNX Runtime: the CPU EP here; the CUDA EP where onnxruntime-gpu and a GPU are.

Device arrays are `OrtValue`s on the session's device (host memory for the CPU EP, GPU memory for the
CUDA EP), and every graph runs through IO binding, so outputs fed to the next graph never pass through
the host on a GPU. Outputs of static shape are written into `OutputBuffers` allocated once per runner,
with one IO binding per buffer set (measured on the CPU: as fast as `Session.run`, which allocates per
call); outputs with a dynamic dim (the text batch, the VAE window) are allocated by ONNX Runtime per call.

CUDA EP (device "cuda[:N]"), with cuda-python installed (it is on the GPU machines' image):
- every session runs on one CUDA stream of ours (`user_compute_stream`), and runs return without waiting
  for it (`disable_synchronize_execution_providers`); uploads, staging copies and downloads are queued
  on that stream too, so everything is in order without the host waiting between launches;
- a graph whose inputs and outputs have static shapes (in the default builds: temporal prefill and step,
  denoise_loop, denoise, place, the image VAE) is created with `enable_cuda_graph` and run the `cuda_graphs` way:
  inputs staged in fixed OrtValues (copied on the stream only when their content changed), outputs in
  `OutputBuffers`, and each distinct address set gets its own `gpu_graph_id` and IO binding, bound once.
  ONNX Runtime captures an id after its first runs and replays it from then on (it requires exactly
  this: every input and output bound at the same device address on every run of an id). A graph that
  ONNX Runtime refuses to capture (a node off the CUDA EP) runs without, with a warning; graphs with a
  dynamic dim run eagerly (`gpu_graph_id` -1).
- where the host waits for the device: after each upload (the host array may go away; the runner
  uploads a mask step's inputs together, so this is once per mask step) and for each download (the
  canvas per frame, the pixels, the text features). Without cuda-python: no CUDA graphs, and ONNX
  Runtime waits at the end of every run.
`NOVA_ORT_PLACEMENT=1` records which execution provider runs each node (`placement`, from ONNX
Runtime's verbose log at session creation): the nodes not on the CUDA EP are named.

Status: the CUDA path is written against ONNX Runtime's documented API and NOT run yet (no GPU here);
its host logic runs in CI over the CPU EP with a recording stand-in for the stream (tests/test_cuda_graph_logic.py).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from runtime.backends import cuda_graphs
from runtime.backends.base import Backend, BackendUnavailable, OutputBuffers
from runtime.backends.cuda_graphs import cuda_check, log, native_handle

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(uint8)": np.uint8,
                "tensor(int64)": np.int64, "tensor(bool)": np.bool_}


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, models: Mapping[str, Path], device: str = "cpu", threads: int | None = None, tf32: bool = False):
        """tf32: let the CUDA provider run fp32 matrix work in TF32 (off for fp32 builds, as their parity
        is measured at fp32; the TensorRT build makes the same choice)."""
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendUnavailable("the onnxruntime backend needs the onnxruntime package "
                                     "(pip install -e '.[onnxruntime]')") from None
        self.ort, self.cudart, self.stream = ort, None, None
        capture: set[str] = set()
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendUnavailable("ONNX Runtime has no CUDA execution provider here "
                                         "(install the onnxruntime-gpu extra on a GPU machine)")
            self.device = ("cuda", int(device.partition(":")[2] or 0))
            try:  # CUDA and cuDNN from the nvidia-* pip packages, where they come from there (torch's)
                ort.preload_dlls()
            except Exception as error:  # older builds have no preload_dlls; system libraries may do
                log.info("onnxruntime.preload_dlls: %s", error)
            cuda = {"device_id": self.device[1], "use_tf32": str(int(tf32))}
            self.cudart, self.stream = _cuda_stream(self.device[1])
            if self.stream is not None:
                cuda["user_compute_stream"] = str(native_handle(self.stream))
                capture = {name for name, path in models.items() if _static(path)}
            providers = lambda graph: [("CUDAExecutionProvider",  # noqa: E731
                                        {**cuda, "enable_cuda_graph": "1"} if graph in capture else cuda)]
        else:
            self.device = ("cpu", 0)
            providers = lambda graph: ["CPUExecutionProvider"]  # noqa: E731
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or int(os.environ.get("NOVA_ORT_THREADS", "0"))
        options.log_severity_level = 3
        # The runner calls graphs back to back from one host thread; a pool left spinning after a run
        # competes with the next graph's threads. Measured on mid-t2i with 2 threads (interleaved):
        # 18.7 s per image spinning, 16.3 s without spinning, 15.2 s stopping it after each run.
        options.add_session_config_entry("session.force_spinning_stop", "1")
        self.placement: dict[str, dict[str, Any]] = {}
        self.sessions = {}
        for name, path in models.items():
            try:
                self.sessions[name] = self._session(name, path, options, providers(name))
            except Exception as error:  # ONNX Runtime raises its own types; only a capture request is retried
                if name not in capture:
                    raise
                log.warning("%s: ONNX Runtime cannot capture it in a CUDA graph (%s); it runs without",
                            name, str(error).strip().splitlines()[0][:300])
                capture.discard(name)
                self.sessions[name] = self._session(name, path, options, providers(name))
        # ONNX Runtime falls back to the CPU when the CUDA provider fails to load, with a warning only.
        off_gpu = [name for name, session in self.sessions.items() if session.get_providers()[0] != "CUDAExecutionProvider"]
        if self.device[0] == "cuda" and off_gpu:
            raise BackendUnavailable(f"ONNX Runtime could not start its CUDA provider for {', '.join(off_gpu)} "
                                     f"(CUDA or cuDNN libraries missing or mismatched?)")
        self._outputs = {name: [o.name for o in s.get_outputs()] for name, s in self.sessions.items()}
        self._inputs = {name: {i.name for i in s.get_inputs()} for name, s in self.sessions.items()}
        self._static = {name: {o.name: (tuple(o.shape), _NUMPY_TYPES[o.type]) for o in s.get_outputs()
                               if all(isinstance(d, int) for d in o.shape) and o.type in _NUMPY_TYPES}
                        for name, s in self.sessions.items()}
        self.buffers = OutputBuffers(lambda shape, dtype: cuda_graphs.output_buffer(
            ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, *self.device)))
        self._bindings: dict[int, Any] = {}  # id(buffer set) -> its IO binding (graphs without capture)
        self._use_stream(capture)

    def _use_stream(self, capture: set[str]) -> None:
        """With a stream of ours (self.cudart, self.stream): runs that do not wait, and CUDA graphs for `capture`."""
        self.staging = {name: cuda_graphs.InputStaging(self._like, self._copy) for name in capture}
        self.captured: dict[tuple, tuple[Any, Any]] = {}  # launch key -> (IO binding, run options with its id)
        self.run_options = self._run_options(-1 if self.stream is not None else None)

    def _session(self, name: str, path: Path, options, providers):
        if os.environ.get("NOVA_ORT_PLACEMENT") != "1":
            return self.ort.InferenceSession(str(path), options, providers=providers)
        options.log_severity_level = 0  # verbose: ONNX Runtime logs the node placement while creating the session
        try:
            with tempfile.TemporaryFile("w+") as log_file:
                saved = os.dup(2)
                os.dup2(log_file.fileno(), 2)  # the log goes to the C++ stderr
                try:
                    session = self.ort.InferenceSession(str(path), options, providers=providers)
                finally:
                    os.dup2(saved, 2)
                    os.close(saved)
                log_file.seek(0)
                self.placement[name] = parse_placement(log_file.read())
        finally:
            options.log_severity_level = 3
        return session

    def _run_options(self, graph_id: int | None):
        if graph_id is None:
            return None
        options = self.ort.RunOptions()
        options.log_severity_level = 3
        options.add_run_config_entry("gpu_graph_id", str(graph_id))  # -1: neither captured nor replayed
        options.add_run_config_entry("disable_synchronize_execution_providers", "1")  # runs return at once
        return options

    @property
    def graphs(self) -> tuple[str, ...]:
        return tuple(self.sessions)

    # -- memory: on the stream where there is one ------------------------------------------------------------
    def _like(self, value):
        return self.ort.OrtValue.ortvalue_from_shape_and_type(value.shape(), _NUMPY_TYPES[value.data_type()], *self.device)

    def _copy(self, target, source) -> None:
        """Queue a device-to-device copy on the stream (the staging of an input whose content changed)."""
        nbytes = int(np.prod(target.shape())) * np.dtype(_NUMPY_TYPES[target.data_type()]).itemsize
        cuda_check(self.cudart.cudaMemcpyAsync(target.data_ptr(), source.data_ptr(), nbytes,
                                               self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice, self.stream))

    def upload(self, array: np.ndarray):
        host = np.ascontiguousarray(array)
        if self.stream is None:
            return self.ort.OrtValue.ortvalue_from_numpy(host, *self.device)
        value = self.ort.OrtValue.ortvalue_from_shape_and_type(list(host.shape), host.dtype, *self.device)
        cuda_check(self.cudart.cudaMemcpyAsync(value.data_ptr(), host.ctypes.data, host.nbytes,
                                               self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))
        self.synchronize()  # the host array may go away after return
        return cuda_graphs.new_content(value)

    def download(self, array) -> np.ndarray:
        self.synchronize()
        return np.array(array.numpy())  # a copy: the buffer is written again two calls later

    def synchronize(self) -> None:
        if self.stream is not None:  # else run_with_iobinding returned when the outputs were written
            cuda_check(self.cudart.cudaStreamSynchronize(self.stream))

    # -- running -------------------------------------------------------------------------------------------
    def run(self, graph: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
        session, static = self.sessions[graph], self._static[graph]
        inputs = {name: value if isinstance(value, self.ort.OrtValue) else self.upload(value)
                  for name, value in inputs.items() if name in self._inputs[graph]}  # folded-away inputs are not fed
        buffers = self.buffers.next(graph, static) if static else {}
        if graph in self.staging:
            return self._replayed(graph, session, inputs, buffers)
        binding = self._bindings.get(id(buffers)) if buffers else None
        if binding is None:  # outputs are bound once per buffer set
            binding = session.io_binding()
            for name in self._outputs[graph]:
                if name in buffers:
                    binding.bind_ortvalue_output(name, buffers[name])
                else:
                    binding.bind_output(name, self.device[0], self.device[1])
            if buffers:
                self._bindings[id(buffers)] = binding
        for name, value in inputs.items():
            binding.bind_ortvalue_input(name, value)
        session.run_with_iobinding(binding, self.run_options)
        if len(buffers) == len(self._outputs[graph]):
            return dict(buffers)
        fresh = dict(zip(self._outputs[graph], binding.get_outputs()))
        if self.stream is not None:  # fresh outputs never change: a static graph stages each once
            fresh = {name: cuda_graphs.new_content(value) for name, value in fresh.items()}
        return {**fresh, **buffers}

    def _replayed(self, graph: str, session, inputs: dict[str, Any], outputs: dict[str, Any]) -> dict[str, Any]:
        """A static-shape graph: inputs at fixed addresses, one `gpu_graph_id` per address set."""
        staging = self.staging[graph]
        bound = {name: staging.bind(name, value) for name, value in inputs.items()}
        key = cuda_graphs.launch_key(graph, (v.data_ptr() for v in (*bound.values(), *outputs.values())))
        if key not in self.captured:
            binding = session.io_binding()
            for name, value in bound.items():
                binding.bind_ortvalue_input(name, value)
            for name, value in outputs.items():
                binding.bind_ortvalue_output(name, value)
            graph_id = sum(k[0] == graph for k in self.captured)  # ids per session: 0, 1, ...
            self.captured[key] = (binding, self._run_options(graph_id))
        binding, options = self.captured[key]
        session.run_with_iobinding(binding, options)
        return dict(outputs)


def _cuda_stream(device: int):
    """cuda-python's runtime and a stream of ours on `device`, or (None, None) without cuda-python."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        log.warning("cuda-python is not installed: ONNX Runtime's CUDA provider runs without CUDA graphs, "
                    "waiting for the device after every graph")
        return None, None
    cuda_check(cudart.cudaSetDevice(device))
    return cudart, cuda_check(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking))


def _static(path: Path) -> bool:
    """Whether every input and output of an ONNX graph has a static shape (read without its weights)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return all(d.HasField("dim_value") for v in (*graph.input, *graph.output) for d in v.type.tensor_type.shape.dim)


_PLACED = re.compile(r"placed on \[(\w+)\]\. Number of nodes: (\d+)")


def parse_placement(text: str) -> dict[str, Any]:
    """ONNX Runtime's verbose 'Node placements' log -> {"nodes": {provider: count}, "not_on_cuda": [nodes]}."""
    nodes: dict[str, int] = {}
    named: list[str] = []
    provider = None
    for line in text.splitlines():
        if "VerifyEachNodeIsAssignedToAnEp]" not in line:
            continue
        message = line.split("VerifyEachNodeIsAssignedToAnEp]", 1)[1]
        placed = _PLACED.search(message)
        if placed:
            provider = placed.group(1)
            nodes[provider] = int(placed.group(2))
        elif provider and provider != "CUDAExecutionProvider" and message.startswith("  ") and message.strip():
            named.append(f"{message.strip()} on {provider}")
    return {"nodes": nodes, "not_on_cuda": named}
