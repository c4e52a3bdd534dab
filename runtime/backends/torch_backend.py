"""The graphs' PyTorch modules as a backend (eager on CPU; CUDA graphs on CUDA): parity baseline of the exports.

On a CPU, outputs are the modules' own tensors: they stay valid for as long as they are held (more
than the interface promises), and nothing is staged or captured.

On CUDA, a graph whose outputs have static shapes (temporal prefill and step, spatial, denoise_loop,
denoise, place, the image VAE) replays `torch.cuda.CUDAGraph`s of its eager module (`cuda_graphs`: fixed
input buffers, outputs in `OutputBuffers`, one capture per address set), so the module's numerics are kept: a
mask step's whole diffusion loop is one replay of denoise_loop (at another step count, one denoise
replay per diffusion step and one of place) plus the copies of the inputs that changed. The spatial
graph's one dynamic dim is an input's (the known-token slots): its inputs are staged per shape, so each
bucket is captured once (eager, the runner's spatial call took 29.5 ms at full size on the H200 of 2026-11-28,
the reference's 23.6 ms; the capture per bucket has not run on a GPU yet). Graphs whose outputs have a dynamic
dim (text encoder, video VAE) run eagerly; their outputs are fresh tensors, stamped so that a static graph
stages each once. All captures share one memory pool: every captured graph runs on the one stream, never two at once, and what outlives a replay (output and staging buffers)
is allocated outside the pool. Everything is queued on torch's current stream; the host waits for the
device only where torch does (uploads from pageable memory, downloads) and once per capture.

`compile=True` runs the modules of the graphs a request calls once per latent frame, mask step or diffusion
step (`PER_STEP_GRAPHS`) through `torch.compile` (inductor; weights frozen into the compiled code on a CPU but for
the diffusion MLP's graphs in fp32: `freezes`), each compiled once, on its first call (the dims a graph declares
dynamic, the spatial graph's known-token bucket, compiled as dynamic from the start), its FX graph cache under
TORCHINDUCTOR_CACHE_DIR keeping the code for later processes. The graphs called once per request (text
encoder, temporal prefill, VAE) stay eager: 30-100 s of compilation each buys milliseconds. On CUDA the captured CUDA
graphs replay the compiled kernels (inductor's own CUDA graphs stay off: the captures above are this backend's). Measured on the 2-CPU Intel host (AVX-512 / AMX; mid-t2i,
2 threads, benchmarks/results/2026-12-03-cpu2-intel): spatial 80 -> 73 ms per call in fp32 and 45 -> 33 ms in
bf16, denoise_loop 13 -> 8.6 ms (fp32) and 23 -> 9.4 ms (bf16), after 15-100 s of compilation per graph; off by
default for that cost. On CUDA (one H200, 2026-12-04, benchmarks/results/2026-12-04-h200): tiny-t2i compiled in 38 s
and replayed its captures; at full size (d48w1024) the compilation had not ended when a 560 s benchmark call
stopped (how long it took alone is unknown).

Status: the CUDA path ran on an H200 on tiny-t2i only (eager and compiled; every capture succeeded); its pixels
there and its full-size timings are unmeasured. Its host logic is tested on CPU with a recording stand-in for the
capture (tests/test_cuda_graph_logic.py).
"""

from __future__ import annotations

import time
from typing import Any, Mapping

import numpy as np
import torch

from runtime.backends import cuda_graphs
from runtime.backends.base import Backend, BackendUnavailable, OutputBuffers
from runtime.graphs.contract import GraphSpec, run_module


class TorchCudaGraphs(cuda_graphs.Captures):
    """`Captures` with `torch.cuda.graph`: the eager run before a capture is its warm-up."""

    def __init__(self):
        super().__init__()
        self.pool = torch.cuda.graph_pool_handle()

    def _launch(self, captured) -> None:
        captured.replay()

    def _capture(self, graph: str, enqueue):
        captured = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(captured, pool=self.pool, capture_error_mode="thread_local"):
                enqueue()  # recorded, not executed
        except RuntimeError as error:
            self._failed(graph, error)
            return None
        return captured


# Called once per latent frame, mask step or diffusion step: where a compile pays for itself (module docstring).
PER_STEP_GRAPHS = frozenset({"temporal_step", "spatial", "denoise", "place", "denoise_loop"})


# Inductor's freezing folds the weights into the compiled code as constants and, on a CPU, prepacks each Linear's:
# for MKL's packed sgemm in fp32, for oneDNN (AMX) in bf16. Measured on mid-t2i, both forms compiled in one process
# and called in turns (benchmarks/results/2026-12-03-cpu2-intel/README.md): the packed sgemm pays on the spatial
# graph's hundreds of token rows (frozen 120 against 128 ms per call at 1 thread, 66 against 70 at 2) and costs on
# the diffusion MLP's few dozen (fp32 denoise_loop frozen 11.3 against 9.9 ms at 1 thread, 7.9 against 7.2 at 2, and
# 49 against 32 s of compilation; the same outputs); bf16 gains from it there too (8.9 against 9.3; 8.5 against 9.4).
DIFFUSION_MLP_GRAPHS = frozenset({"denoise", "denoise_loop"})


def freezes(spec: GraphSpec) -> bool:
    return not (spec.name in DIFFUSION_MLP_GRAPHS and spec.precision == "fp32")


class Compiled:
    """A graph's module through torch.compile, as `compile=True` runs it (benchmarks/profile_graphs.py profiles the
    same). Freezing is an inductor setting read when a call compiles (the first, or one with new shapes), so each call
    runs under its graph's own value (`freezes`), leaving the process's setting as it was."""

    def __init__(self, module: torch.nn.Module, spec: GraphSpec):
        self.function, self.freezing = torch.compile(module), freezes(spec)
        # The dims the spec declares dynamic (the spatial graph's known-token slots), marked on the first call: one
        # dynamic-shape compile, not a static one and, at the next bucket, a dynamic one. Measured (mid-t2i, 2 threads,
        # cold cache, AMD host, 2026-12-04): the spatial graph compiles 33 s once against 28 + 21 s; 7.3-7.4 s per request
        # after, both ways, the same pixels.
        self.dynamic = {t.name: list(t.dynamic_axes) for t in spec.inputs if t.dynamic_axes}
        self.marked = False

    def __call__(self, **inputs: torch.Tensor) -> Any:
        import torch._inductor.config as inductor

        if not self.marked:
            for name, dims in self.dynamic.items():
                for dim in dims:
                    torch._dynamo.maybe_mark_dynamic(inputs[name], dim)
            self.marked = True
        with inductor.patch(freezing=self.freezing):
            return self.function(**inputs)


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, specs: Mapping[str, GraphSpec], device: str | torch.device = "cpu", compile: bool = False):
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable(f"the torch backend cannot use {device}: this torch build sees no CUDA GPU")
        self.specs = dict(specs)
        self.modules = {name: spec.build().to(self.device) for name, spec in self.specs.items()}
        self.compile_seconds: dict[str, float] | None = None  # per compiled graph, its first (compiling) call
        if compile:
            self._compile()
        self.captures = None
        if self.device.type == "cuda":
            self._use_cuda_graphs(TorchCudaGraphs())

    def _compile(self) -> None:
        self.compile_seconds = {}
        self.modules = {name: Compiled(module, self.specs[name]) if name in PER_STEP_GRAPHS else module
                        for name, module in self.modules.items()}

    def _use_cuda_graphs(self, captures: cuda_graphs.Captures) -> None:
        """Stage, buffer and capture every graph whose outputs have static shapes (inputs with a dynamic dim are
        staged per shape, each shape captured once)."""
        static = [name for name, spec in self.specs.items() if not any(t.dynamic_axes for t in spec.outputs)]
        self.captures = captures
        self.staging = {name: cuda_graphs.InputStaging(lambda value: torch.empty_like(value),
                                                       lambda buffer, value: buffer.copy_(value),
                                                       dynamic=frozenset(t.name for t in self.specs[name].inputs
                                                                         if t.dynamic_axes))
                        for name in static}
        self.static_outputs = {name: {t.name: (t.shape, t.torch_dtype) for t in self.specs[name].outputs}
                               for name in static}
        self.buffers = OutputBuffers(lambda shape, dtype: cuda_graphs.output_buffer(
            torch.empty(shape, dtype=dtype, device=self.device)))

    @property
    def graphs(self) -> tuple[str, ...]:
        return tuple(self.modules)

    def upload(self, array: np.ndarray) -> torch.Tensor:
        host = np.ascontiguousarray(array)
        tensor = torch.from_numpy(host if host.flags.writeable else host.copy()).to(self.device)
        return cuda_graphs.new_content(tensor) if self.captures is not None else tensor

    def download(self, array: torch.Tensor) -> np.ndarray:
        return array.detach().float().cpu().numpy() if array.dtype == torch.bfloat16 else array.detach().cpu().numpy()

    def run(self, graph: str, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        spec, module = self.specs[graph], self.modules[graph]
        if self.compile_seconds is not None and graph in PER_STEP_GRAPHS and graph not in self.compile_seconds:
            start = time.perf_counter()
            outputs = self._run(spec, module, graph, inputs)
            self.synchronize()
            self.compile_seconds[graph] = time.perf_counter() - start
            return outputs
        return self._run(spec, module, graph, inputs)

    def _run(self, spec: GraphSpec, module, graph: str, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        if self.captures is None:
            return run_module(spec, module, inputs)
        if graph not in self.staging or graph in self.captures.eager:
            return {name: cuda_graphs.new_content(value) for name, value in run_module(spec, module, inputs).items()}
        staging = self.staging[graph]
        bound = {t.name: staging.bind(t.name, inputs[t.name]) for t in spec.inputs}
        outputs = dict(self.buffers.next(graph, self.static_outputs[graph]))
        key = cuda_graphs.launch_key(graph, (v.data_ptr() for v in (*bound.values(), *outputs.values())))
        if not self.captures.replay(key):
            self.captures.record(key, lambda: self._write(spec, module, bound, outputs))
        return outputs

    @staticmethod
    def _write(spec: GraphSpec, module, bound: dict, outputs: dict) -> None:
        """The module on the bound inputs, its results copied into the output buffers (what is captured)."""
        for name, value in run_module(spec, module, bound).items():
            outputs[name].copy_(value)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
