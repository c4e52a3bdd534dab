"""The TensorRT backend's host-side logic (allocator, input staging, CUDA-graph capture) over a
recording stand-in for cuda-python's runtime. The backend itself needs a GPU and TensorRT, absent
here; these tests check what it asks of the driver, not that the driver does it."""

import types

import numpy as np
import pytest

from runtime.backends.tensorrt_backend import CudaGraphs, DeviceArray, DeviceMemory, InputStaging


class Driver:
    """Records cudaMalloc / cudaFree and the graph-capture calls; each call returns (error, *values)."""

    cudaStreamCaptureMode = types.SimpleNamespace(cudaStreamCaptureModeThreadLocal="thread-local")

    def __init__(self, fail_capture: bool = False):
        self.malloc, self.freed, self.calls, self.next = [], [], [], 4096
        self.fail_capture, self.capturing = fail_capture, False

    def cudaMalloc(self, nbytes):
        self.next += 4096
        self.malloc.append(nbytes)
        return 0, self.next

    def cudaFree(self, ptr):
        self.freed.append(ptr)
        return (0,)

    def cudaStreamBeginCapture(self, stream, mode):
        assert mode == "thread-local" and not self.capturing
        self.capturing = True
        self.calls.append("begin")
        return (0,)

    def cudaStreamEndCapture(self, stream):
        self.capturing = False
        self.calls.append("end")
        return (901 if self.fail_capture else 0), "recorded"

    def cudaGraphInstantiate(self, graph, flags):
        self.calls.append("instantiate")
        return 0, f"exec{len([c for c in self.calls if c == 'instantiate'])}"

    def cudaGraphDestroy(self, graph):
        return (0,)

    def cudaGraphLaunch(self, graph_exec, stream):
        self.calls.append(f"launch {graph_exec}")
        return (0,)

    def cudaGraphExecDestroy(self, graph_exec):
        self.calls.append(f"destroy {graph_exec}")
        return (0,)

    def cudaGetLastError(self):
        self.calls.append("clear error")
        return (0,)


def test_device_memory_reuses_freed_allocations():
    driver = Driver()
    memory = DeviceMemory(driver)
    noise = DeviceArray(memory, (2, 16), np.float32)
    first = noise.ptr
    del noise  # a per-call upload dropped after its launch
    again = DeviceArray(memory, (4, 8), np.float32)  # same size: the same memory, no new cudaMalloc
    other = DeviceArray(memory, (3,), np.int64)
    assert again.ptr == first and driver.malloc == [128, 24] and driver.freed == []
    assert again.serial != DeviceArray(memory, (1,), np.int8).serial  # same memory, new content: new serial
    del again, other, memory
    assert sorted(driver.freed) == sorted([first, first + 4096, first + 8192])  # all freed when the backend goes


def test_input_staging_binds_fixed_addresses_and_copies_only_new_content():
    memory = DeviceMemory(Driver())
    copies = []
    staging = InputStaging(memory, lambda target, source: copies.append((target.ptr, getattr(source, "ptr", "host"))))
    guidance = DeviceArray(memory, (1,), np.float32)  # a per-request constant, uploaded once
    rows = [DeviceArray(memory, (6,), np.float32) for _ in range(3)]  # a sampler row per step
    z = DeviceArray(memory, (2, 4, 8), np.float32, graph_output=True)  # another graph's output buffer
    bound = [{"guidance_scale": staging.bind("guidance_scale", guidance), "coefficients": staging.bind("coefficients", row),
              "z_selected": staging.bind("z_selected", z), "noise": staging.bind("noise", np.zeros((2, 3), np.float32))}
             for row in rows]
    assert all(b["z_selected"] is z for b in bound)  # output buffers are bound in place
    for name in ("guidance_scale", "coefficients", "noise"):
        assert len({b[name].ptr for b in bound}) == 1 and bound[0][name].ptr != guidance.ptr  # one staging buffer
    target = {name: bound[0][name].ptr for name in ("guidance_scale", "coefficients", "noise")}
    assert copies.count((target["guidance_scale"], guidance.ptr)) == 1  # unchanged content: copied once
    assert [c for c in copies if c[0] == target["coefficients"]] == [(target["coefficients"], r.ptr) for r in rows]
    assert copies.count((target["noise"], "host")) == 3  # host arrays: copied every call
    with pytest.raises(ValueError, match=r"input noise: float32\[2, 4\] where the engine takes float32\[2, 3\]"):
        staging.bind("noise", np.zeros((2, 4), np.float32))


def _launch(graphs: CudaGraphs, key: tuple, enqueue) -> None:
    """What the backend does per launch of a static-shape graph."""
    if not graphs.replay(key):
        graphs.record(key, enqueue)


def test_cuda_graphs_capture_each_address_set_once_then_replay():
    driver, enqueued = Driver(), []
    graphs = CudaGraphs(driver, stream="s")
    for key in [("denoise", 1, 2), ("denoise", 1, 2), ("denoise", 1, 3), ("denoise", 1, 2), ("denoise", 1, 3)]:
        _launch(graphs, key, lambda: enqueued.append(driver.capturing))
    # first launch of each address set: eager (the result), then captured (recorded, not run); then replays
    assert enqueued == [False, True, False, True]
    assert driver.calls == ["begin", "end", "instantiate", "launch exec1",
                            "begin", "end", "instantiate", "launch exec1", "launch exec2"]
    del graphs
    assert driver.calls[-2:] == ["destroy exec1", "destroy exec2"]


def test_a_graph_whose_capture_fails_runs_eagerly_from_then_on(caplog):
    driver, enqueued = Driver(fail_capture=True), []
    graphs = CudaGraphs(driver, stream="s")
    _launch(graphs, ("temporal_step", 7), lambda: enqueued.append(driver.capturing))
    assert enqueued == [False, True] and "temporal_step" in graphs.eager  # one failed capture; the call still ran
    assert driver.calls == ["begin", "end", "clear error"] and "temporal_step: CUDA graph capture failed" in caplog.text

    def broken():
        if driver.capturing:
            raise RuntimeError("TensorRT failed to run place")

    driver.fail_capture = False
    _launch(graphs, ("place", 8), broken)  # an enqueue that fails under capture: capture ended and cleaned up
    assert driver.calls[-3:] == ["begin", "end", "clear error"] and "place" in graphs.eager and not driver.capturing
    assert not graphs.execs


def test_tensorrt_runner_on_a_simulated_gpu_computes_what_onnxruntime_does(tiny_t2i, t2i_engines, tmp_path, monkeypatch):
    """An engine folder built for TensorRT and the runner over it, end to end on tests/simulated_gpu.py
    (each plan's ONNX graph runs in ONNX Runtime at the bound addresses): bindings, staging, output turns,
    CUDA-graph capture and replay, allocation."""
    import shutil

    from export.build import BuildOptions, build
    from export.manifest import load_manifest
    from runtime.graphs.profile import BuildProfile
    from runtime.runner import NOVARunner
    from runtime.schedules import mask_schedule
    from tests import simulated_gpu

    monkeypatch.setenv("NOVA_ORT_THREADS", "1")  # both sides on one thread: the same rounding
    gpu = simulated_gpu.install(monkeypatch)
    folder = shutil.copytree(t2i_engines, tmp_path / "trt")  # its ONNX graphs are reused, plans added
    built = load_manifest(folder)  # the same options, so that the ONNX graphs are reused
    build(BuildOptions(checkpoint=tiny_t2i, out=folder, precision=built["precision"], backend="tensorrt",
                       exporter=built["components"]["spatial"]["export"]["exporter"],
                       profile=BuildProfile(**built["profile"]), validate=False, progress=False),
          report=lambda message: None)
    runner = NOVARunner.from_engines(folder)  # auto: plans, TensorRT and no device given -> TensorRT on cuda
    assert runner.backend.name == "tensorrt"
    assert NOVARunner.from_engines(folder, device="cpu").backend.name == "onnxruntime"  # auto on a CPU
    expected = NOVARunner.from_engines(t2i_engines, backend="onnxruntime")
    options = dict(seed=0, num_inference_steps=8, num_diffusion_steps=4, negative_prompt="blurry")  # unrolled: 4

    first = runner("a lighthouse", **options)
    theirs = expected("a lighthouse", **options)
    assert np.array_equal(first.latents, theirs.latents) and np.array_equal(first.images, theirs.images)
    backend = runner.backend
    assert {key[0] for key in backend.cuda_graphs.execs} == {"temporal_prefill", "denoise_loop", "vae_decoder"}
    assert len(backend.captured_contexts) == len(backend.cuda_graphs.execs)  # a context per captured graph

    mallocs = gpu.mallocs
    for _ in range(2):  # graphs run once per request alternate output sets: steady from the second request on
        counts = dict(gpu.counts)
        again = runner("a lighthouse", **options)
        assert np.array_equal(again.latents, first.latents) and np.array_equal(again.images, first.images)
    assert gpu.mallocs == mallocs  # buffers and staging are permanent, uploads reuse the first request's memory
    steps = len(mask_schedule(runner.geometry.num_tokens, 8))
    launches = {key: gpu.counts[key] - counts[key] for key in counts}
    assert launches["capture"] == 0 and launches["graph_launch"] == 2 + steps  # prefill, vae; denoise_loop per step
    # the host waits for the device: the text features, the frame's index inputs, each later mask step's noise
    # (uploaded before its launches), the canvas and the pixels; never between the launches of a mask step
    assert launches["wait"] == 1 + 1 + (steps - 1) + 1 + 1
    assert launches["execute"] - launches["graph_launch"] == 1 + steps  # eager: the text encoder, spatial per step

    fallback = {**options, "num_diffusion_steps": 3}  # a count the build did not unroll: denoise x 3, then place
    ours, theirs = runner("a lighthouse", **fallback), expected("a lighthouse", **fallback)
    assert np.array_equal(ours.latents, theirs.latents) and np.array_equal(ours.images, theirs.images)
    assert {key[0] for key in backend.cuda_graphs.execs} >= {"denoise", "place"}  # static shapes: captured too

    feeds = {"canvas": np.zeros((1, 4, 8, 8), np.float64)}  # float64 where the engine takes float32: refused
    with pytest.raises(ValueError, match=r"place: input canvas is float64\[1, 4, 8, 8\] where the engine takes float32"):
        backend.run("place", feeds)


def test_bfloat16_downloads_as_float32():
    from runtime.backends.tensorrt_backend import BFLOAT16, _from_bfloat16

    values = np.array([1.5, -2.0, 3.140625], np.float32)  # exactly representable in bfloat16
    bits = (values.view(np.uint32) >> 16).astype("<u2").view(BFLOAT16)
    assert np.array_equal(_from_bfloat16(bits), values)
