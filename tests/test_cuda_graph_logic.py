"""The CUDA-graph path of the torch and ONNX Runtime backends, on CPU, with recording stand-ins for what needs
a GPU: `torch.cuda.CUDAGraph` (a capture records the launch without running it; a replay runs the
recording on the buffers bound at capture) and cuda-python's stream (copies run at once). The sessions,
IO bindings and modules are the real ones. These check the host logic (which inputs are copied, which
address sets are captured, graph ids and bindings, output turns, eager fallback), not CUDA itself."""

import ctypes
import types

import numpy as np
import pytest

from runtime.backends.cuda_graphs import Captures
from runtime.graphs.profile import BuildProfile
from runtime.runner import NOVARunner

STATIC = {"temporal_prefill", "denoise", "place", "denoise_loop", "vae_decoder"}  # the t2i graphs without a dynamic dim


class RecordedCaptures(Captures):
    """torch.cuda.CUDAGraph's semantics on a CPU: capturing records the launch, replaying runs the recording."""

    def __init__(self, fail: set[str] = frozenset()):
        super().__init__()
        self.fail, self.captures, self.replays = fail, [], 0

    def _capture(self, graph, enqueue):
        if graph in self.fail:
            self._failed(graph, "simulated failure")
            return None
        self.captures.append(graph)
        return enqueue  # recorded, not run

    def _launch(self, captured):
        self.replays += 1
        captured()


def count_copies(staging: dict, copies: dict) -> None:
    """Count the staging copies per (graph, input)."""
    for graph, stage in staging.items():
        def counted(buffer, value, graph=graph, stage=stage, copy=stage.copy):
            name = next(n for n, b in stage.buffers.items() if b is buffer)
            copies[(graph, name)] = copies.get((graph, name), 0) + 1
            copy(buffer, value)

        stage.copy = counted


def same(a, b) -> bool:
    return np.array_equal(a.latents, b.latents) and all(
        np.array_equal(x, y) for x, y in ((a.images, b.images), (a.frames, b.frames)) if x is not None)


@pytest.mark.parametrize("video", [False, True])
def test_torch_backend_replays_captures_over_fixed_buffers(tiny_t2i, tiny_t2v, video):
    checkpoint = tiny_t2v if video else tiny_t2i
    profile = BuildProfile(min_mask_steps=4, max_latent_length=3 if video else None)
    options = dict(seed=0, num_inference_steps=4, num_diffusion_steps=3, max_latent_length=3 if video else 1)
    expected = NOVARunner.from_checkpoint(checkpoint, profile)("a lighthouse", **options)
    runner = NOVARunner.from_checkpoint(checkpoint, profile)
    backend, captures, copies = runner.backend, RecordedCaptures(), {}
    backend._use_cuda_graphs(captures)
    static = STATIC - {"vae_decoder"} | {"temporal_step", "vae_decoder_single", "vae_encoder"} if video else STATIC
    static = static | {"spatial"}  # its one dynamic dim is an input's: staged per shape, captured per bucket
    assert set(backend.staging) == static  # the text encoder and the video VAE have dynamic outputs: eager
    # 3 latents decode in one (dynamic) window; 3 diffusion steps, not the built 25: the per-step fallback runs
    launched = static - {"vae_decoder_single", "vae_encoder", "denoise_loop"}
    count_copies(backend.staging, copies)

    results = [runner("a lighthouse", **options) for _ in range(2)]
    captured = len(captures.captures)
    assert set(captures.captures) == launched
    copies.clear()
    replays = captures.replays
    results.append(runner("a lighthouse", **options))
    assert all(same(result, expected) for result in results)  # bit-identical to the eager modules
    assert len(captures.captures) == captured  # steady state: every static launch is a replay
    steps, frames = 4, options["max_latent_length"]
    assert captures.replays - replays == 1 + (frames - 1) + frames * steps * (1 + 3 + 1) + (0 if video else 1)
    # the spatial graph: one known_ids buffer per bucket, each bucket captured (at each output buffer set it met)
    buckets = [slot for slot in backend.staging["spatial"].buffers if slot[0] == "known_ids"]
    assert len(buckets) >= 2 and captures.captures.count("spatial") >= len(buckets)
    # per request: constants once, the step's inputs when they change; other graphs' output buffers never
    assert copies[("denoise", "guidance_scale")] == 1 and copies[("denoise", "timestep")] == frames * steps * 3
    assert ("denoise", "z_selected") not in copies  # spatial writes it into its output buffers: bound in place
    assert copies[("denoise", "x")] == frames * steps  # the step's initial noise; then x_next bound in place
    assert ("place", "canvas") in copies and ("place", "x") not in copies
    if video:
        assert ("temporal_step", "k_cache") not in copies  # the KV cache: output buffers, in place, in turn
    assert {key[0] for key in backend.buffers.sets} == launched  # one buffer pair per graph (and shape)


def test_torch_backend_runs_a_graph_eagerly_when_its_capture_fails(tiny_t2i, caplog):
    profile, options = BuildProfile(min_mask_steps=4), dict(seed=3, num_inference_steps=4, num_diffusion_steps=2)
    expected = NOVARunner.from_checkpoint(tiny_t2i, profile)("a cat", **options)
    runner = NOVARunner.from_checkpoint(tiny_t2i, profile)
    captures = RecordedCaptures(fail={"denoise"})
    runner.backend._use_cuda_graphs(captures)
    assert same(runner("a cat", **options), expected) and same(runner("a cat", **options), expected)
    assert captures.eager == {"denoise"} and "denoise" not in captures.captures
    assert "denoise: CUDA graph capture failed" in caplog.text


class HostStream:
    """cuda-python's runtime calls the ONNX Runtime backend makes, on host memory: copies run at once."""

    cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice="h2d", cudaMemcpyDeviceToDevice="d2d")

    def __init__(self):
        self.copies, self.waits = [], 0

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        assert stream == 7
        self.copies.append(kind)
        ctypes.memmove(dst, src, nbytes)
        return (0,)

    def cudaStreamSynchronize(self, stream):
        self.waits += 1
        return (0,)


def test_onnxruntime_backend_binds_fixed_addresses_with_one_graph_id_each(t2i_engines):
    from runtime.backends.onnxruntime_backend import _static
    from runtime.engine_folder import EngineFolder

    options = dict(seed=0, num_inference_steps=8, num_diffusion_steps=3)
    expected = NOVARunner.from_engines(t2i_engines, backend="onnxruntime")("a cat", **options)
    runner = NOVARunner.from_engines(t2i_engines, backend="onnxruntime")
    backend, folder = runner.backend, EngineFolder.open(t2i_engines)
    capture = {name for name in backend.sessions if _static(folder.onnx_path(name))}
    assert capture == STATIC
    backend.cudart, backend.stream = HostStream(), 7
    backend._use_stream(capture)
    runs = []
    for graph, session in backend.sessions.items():
        def recorded(binding, run_options, graph=graph, original=session.run_with_iobinding):
            runs.append((graph, id(binding), run_options.get_run_config_entry("gpu_graph_id"),
                         run_options.get_run_config_entry("disable_synchronize_execution_providers")))
            original(binding, run_options)

        session.run_with_iobinding = recorded
    copies = {}
    count_copies(backend.staging, copies)

    results = [runner("a cat", **options) for _ in range(2)]
    keys = dict(backend.captured)
    copies.clear()
    del runs[:], backend.cudart.copies[:]
    backend.cudart.waits = 0
    results.append(runner("a cat", **options))
    assert all(same(result, expected) for result in results)
    assert backend.captured == keys  # no new address sets: every static launch reuses its binding and id
    assert all(sync == "1" for *_, sync in runs)  # no run waits for the device
    assert {(g, gid) for g, _, gid, _ in runs if g not in STATIC} == {("text_encoder", "-1"), ("spatial", "-1")}
    ids = {}
    for graph, binding, graph_id, _ in runs:
        if graph in STATIC:
            ids.setdefault((graph, graph_id), set()).add(binding)
    assert all(len(bindings) == 1 for bindings in ids.values())  # one binding per graph id
    for graph in STATIC:  # ids 0, 1, ... per session, one per address set
        assigned = sorted(int(run_options.get_run_config_entry("gpu_graph_id"))
                          for key, (_, run_options) in keys.items() if key[0] == graph)
        assert assigned == list(range(len(assigned))) and {int(i) for g, i in ids if g == graph} <= set(assigned)
    steps = sum(g == "spatial" for g, *_ in runs)
    assert copies[("denoise", "guidance_scale")] == 1 and copies[("denoise", "timestep")] == steps * 3
    assert copies[("denoise", "x")] == steps  # the step's initial noise; then x_next in place
    assert ("denoise", "z_selected") not in copies  # spatial writes it into output buffers (static shape) too
    assert ("place", "x") not in copies and ("place", "canvas") in copies  # output buffers are bound in place
    assert backend.cudart.copies.count("d2d") == sum(copies.values())  # staging copies: on the stream
    downloads = 1 + 1 + 1  # the text features, the canvas, the pixels
    assert backend.cudart.waits == backend.cudart.copies.count("h2d") + downloads  # uploads wait (host memory)


def test_onnxruntime_reports_node_placement(t2i_engines, monkeypatch):
    from runtime.backends.onnxruntime_backend import parse_placement

    monkeypatch.setenv("NOVA_ORT_PLACEMENT", "1")
    backend = NOVARunner.from_engines(t2i_engines, backend="onnxruntime").backend
    assert set(backend.placement) == set(backend.sessions)
    for placed in backend.placement.values():
        assert list(placed["nodes"]) == ["CPUExecutionProvider"] and placed["nodes"]["CPUExecutionProvider"] > 0
    log = "\n".join(f"2026-11-28 [V:onnxruntime:, session_state.cc:1581 VerifyEachNodeIsAssignedToAnEp] {m}" for m in [
        " Node placements", "  Node(s) placed on [CUDAExecutionProvider]. Number of nodes: 40", "   MatMul (/mlp/MatMul)",
        "  Node(s) placed on [CPUExecutionProvider]. Number of nodes: 2", "   Shape (/Shape)", "   Gather (/Gather_3)"])
    assert parse_placement(log) == {"nodes": {"CUDAExecutionProvider": 40, "CPUExecutionProvider": 2},
                                    "not_on_cuda": ["Shape (/Shape) on CPUExecutionProvider",
                                                    "Gather (/Gather_3) on CPUExecutionProvider"]}
