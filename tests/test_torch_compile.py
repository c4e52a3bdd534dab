"""The torch backend with torch.compile: the same results as its eager modules, within fp32 rounding, on the graphs
that pay for a compile.

Compiles one small graph (tiny-t2i's single diffusion step; inductor's C++ toolchain costs ~30 s cold on the
2-CPU machine, seconds with its FX graph cache): the large graphs' compile times are measured by the benchmarks.
"""

import pytest
import torch

from runtime.backends.torch_backend import TorchBackend
from runtime.configs import CheckpointConfigs
from runtime.graphs import BuildProfile, build_specs


def test_compiled_graph_matches_its_eager_module(tiny_t2i):
    specs = build_specs(CheckpointConfigs.read(tiny_t2i), BuildProfile(min_mask_steps=4, diffusion_steps=2), "fp32")
    graph = {"denoise": specs["denoise"]}
    eager, compiled = TorchBackend(graph), TorchBackend(graph, compile=True)
    assert compiled.compile_seconds == {}
    for seed in (0, 1):  # the first call compiles (timed), the second runs the compiled code
        inputs = specs["denoise"].sample({}, torch.Generator().manual_seed(seed))
        expected, got = eager.run("denoise", inputs), compiled.run("denoise", inputs)
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-5)
    assert set(compiled.compile_seconds) == {"denoise"} and compiled.compile_seconds["denoise"] > 0
    assert isinstance(compiled.modules["denoise"].function, torch._dynamo.eval_frame.OptimizedModule)


def test_each_graph_compiles_under_its_own_freezing_setting(tiny_t2i):
    """Freezing (weights as prepacked constants) for every compiled graph but the diffusion MLP's in fp32, where MKL's
    packed sgemm is the slower one (runtime/backends/torch_backend.py); set per call, the process's own left as is."""
    import torch._inductor.config as inductor

    from runtime.backends.torch_backend import Compiled

    profile = BuildProfile(min_mask_steps=4, diffusion_steps=2)
    specs = {p: build_specs(CheckpointConfigs.read(tiny_t2i), profile, p) for p in ("fp32", "bf16")}
    before, seen = inductor.freezing, []
    for precision, graph, frozen in (("fp32", "denoise", False), ("fp32", "denoise_loop", False),
                                     ("fp32", "spatial", True), ("bf16", "denoise_loop", True)):
        compiled = Compiled(torch.nn.Identity(), specs[precision][graph])
        compiled.function = lambda **inputs: seen.append(inductor.freezing)  # what a compiling call reads
        compiled(**specs[precision][graph].sample({}, torch.Generator().manual_seed(0)))
        assert seen.pop() is frozen and inductor.freezing == before, (precision, graph)


def test_runner_compiles_the_per_step_graphs_only(tiny_t2i):
    """`NOVARunner.from_checkpoint(compile=True)` wraps the graphs called per mask or diffusion step; the graphs
    called once per request stay eager (their compile would cost more than it saves). Nothing compiles yet:
    inductor runs on a graph's first call."""
    from runtime.backends.torch_backend import PER_STEP_GRAPHS, Compiled
    from runtime.runner import NOVARunner

    runner = NOVARunner.from_checkpoint(tiny_t2i, BuildProfile(min_mask_steps=4, diffusion_steps=2), compile=True)
    compiled = {name for name, module in runner.backend.modules.items() if isinstance(module, Compiled)}
    assert compiled == PER_STEP_GRAPHS & set(runner.backend.modules)
    assert {"spatial", "denoise_loop"} <= compiled and {"text_encoder", "vae_decoder"}.isdisjoint(compiled)
    assert runner.backend.compile_seconds == {}


def test_an_engine_folder_compiles_on_the_torch_backend_only(t2i_engines):
    from runtime.backends.torch_backend import PER_STEP_GRAPHS, Compiled
    from runtime.runner import NOVARunner

    runner = NOVARunner.from_engines(t2i_engines, backend="torch", compile=True)
    assert {name for name, module in runner.backend.modules.items()
            if isinstance(module, Compiled)} == PER_STEP_GRAPHS & set(runner.graphs)
    for backend in ("auto", "onnxruntime"):
        with pytest.raises(ValueError, match=f"compile=True needs backend='torch'.*got backend='{backend}'"):
            NOVARunner.from_engines(t2i_engines, backend=backend, compile=True)


def test_declared_dynamic_dims_compile_once(tiny_t2i, monkeypatch):
    """The spatial graph's known-token slots change with the bucket; marked dynamic on the first call, they compile
    one graph, where torch would compile a static one and then, at the next bucket, a dynamic one. Dynamo's real
    guards, inductor's codegen left out (backend="eager": seconds, not a C++ build)."""
    from torch._dynamo.utils import counters

    from runtime.backends.torch_backend import Compiled

    specs = build_specs(CheckpointConfigs.read(tiny_t2i), BuildProfile(min_mask_steps=4), "fp32")
    spec = specs["spatial"]
    assert [t.name for t in spec.inputs if t.dynamic_axes] == ["known_ids"]

    class Slots(torch.nn.Module):  # what the size of known_ids changes: the number of gathered tokens
        def forward(self, known_ids, **others):
            return known_ids.float().mean(dim=1) * known_ids.shape[1]

    compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module: compile(module, backend="eager"))
    for marked, graphs in ((True, 1), (False, 2)):
        torch._dynamo.reset()
        counters.clear()
        compiled = Compiled(Slots(), spec)
        compiled.marked = not marked  # False: as before the marking, torch's own recompile at a new shape
        for slots in (2, 4, 6):
            inputs = {t.name: torch.zeros(t.concrete({"known_slots": slots}), dtype=t.torch_dtype) for t in spec.inputs}
            assert compiled(**inputs).tolist() == [0.0] * inputs["known_ids"].shape[0]
        assert counters["frames"]["ok"] == graphs, marked
