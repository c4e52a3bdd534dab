"""The diffusion loop in one launch per mask step (`denoise_loop`): the same output as the per-step graphs
(`denoise` x S, then `place`), bit for bit in ONNX Runtime, the launches per mask step on both paths, and
the step-independent work done once per loop."""

from collections import Counter

import numpy as np
import onnx
import pytest
import torch

from runtime.configs import CheckpointConfigs
from runtime.graphs import build_specs, run_module
from runtime.graphs.common import ModuleCache
from runtime.graphs.profile import BuildProfile
from runtime.runner import NOVARunner
from runtime.schedules import mask_schedule

# flow matching (tiny-t2i); DDPM with step noise and clipping (tiny-t2v), over 2 latent frames
CASES = {"t2i": dict(num_inference_steps=8, num_diffusion_steps=4),
         "t2v": dict(num_inference_steps=4, num_diffusion_steps=4, max_latent_length=2)}


def per_step(runner: NOVARunner) -> NOVARunner:
    """The same backend and build without denoise_loop: the runner's fallback path."""
    graphs = {name: declaration for name, declaration in runner.graphs.items() if name != "denoise_loop"}
    return NOVARunner(runner.backend, runner.configs, runner.profile, graphs)


def launches(runner: NOVARunner, **options) -> tuple[np.ndarray, Counter]:
    """The latents of one request and its backend.run calls per graph."""
    calls, run = Counter(), runner.backend.run

    def counted(graph, inputs):
        calls[graph] += 1
        return run(graph, inputs)

    runner.backend.run = counted
    try:
        return runner("waves on a beach", seed=0, **options).latents, calls
    finally:
        runner.backend.run = run


@pytest.fixture(scope="module")
def torch_runners(tiny_t2i, tiny_t2v):
    return {"t2i": NOVARunner.from_checkpoint(tiny_t2i, BuildProfile(min_mask_steps=8, diffusion_steps=4)),
            "t2v": NOVARunner.from_checkpoint(tiny_t2v, BuildProfile(min_mask_steps=4, max_latent_length=2,
                                                                     diffusion_steps=4))}


@pytest.mark.parametrize("which", ["t2i", "t2v"])
def test_torch_loop_runs_in_one_launch_per_mask_step(which, torch_runners):
    """The numbers: test_torch_loop_graph_equals_per_step_graphs (a whole request amplifies rounding)."""
    runner, options = torch_runners[which], CASES[which]
    mask_steps = options.get("max_latent_length", 1) * len(mask_schedule(runner.geometry.num_tokens,
                                                                          options["num_inference_steps"]))
    _, calls = launches(runner, **options)
    assert calls["spatial"] == calls["denoise_loop"] == mask_steps  # 2 launches per mask step
    assert calls["denoise"] == calls["place"] == 0
    _, fallback = launches(per_step(runner), **options)
    assert fallback["denoise"] == mask_steps * 4 and fallback["place"] == mask_steps and not fallback["denoise_loop"]

    # a step count the build did not unroll: the single-step graphs, one launch per diffusion step
    _, calls = launches(runner, **{**options, "num_diffusion_steps": 3})
    assert calls["denoise"] == mask_steps * 3 and calls["place"] == calls["spatial"] == mask_steps
    assert not calls["denoise_loop"]


@pytest.mark.parametrize("which", ["t2i", "t2v"])  # flow matching; DDPM with step noise and clipping
def test_torch_loop_graph_equals_per_step_graphs(which, request):
    """denoise_loop against S calls of denoise, then place, on the loop's sample inputs (guidance truncated at a
    random step). Not bit for bit in torch: the loop embeds its S timesteps in one S-row product, denoise its one
    in a 1-row product, and MKL rounds products of 1 to 3 rows differently from larger ones (ONNX Runtime does
    not: bit-equal there, test_onnxruntime_loop_equals_per_step_graphs)."""
    folder = request.getfixturevalue(f"tiny_{which}")
    specs = build_specs(CheckpointConfigs.read(folder), BuildProfile(min_mask_steps=4, diffusion_steps=4), "fp32",
                        modules=ModuleCache(folder))
    loop, step, place = (specs[name] for name in ("denoise_loop", "denoise", "place"))
    inputs = loop.sample(loop.dims_at("opt"), torch.Generator().manual_seed(3))
    assert bool(inputs["noise"].any()) == (which == "t2v")  # DDPM adds step noise; flow matching none
    module, x = step.build(), inputs["x"]
    for j in range(4):
        x = run_module(step, module, {"x": x, "z_selected": inputs["z_selected"],
                                      "timestep": inputs["timesteps"][j:j + 1],
                                      "coefficients": inputs["coefficients"][j], "clip_range": inputs["clip_range"],
                                      "noise": inputs["noise"][j],
                                      "guidance_scale": inputs["guidance_scale"][j:j + 1]})["x_next"]
    expected = run_module(place, place.build(), {**inputs, "x": x})["canvas_out"]
    looped = run_module(loop, loop.build(), inputs)["canvas_out"]
    torch.testing.assert_close(looped, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", ["t2i", "t2v"])
def test_onnxruntime_loop_equals_per_step_graphs(which, request):
    """Measured bit-equal in fp32 (ONNX Runtime 1.31.1, CPU provider; the issue's bar is 1e-5). The engine
    fixtures unroll 4 steps (tests/conftest.py); one ONNX Runtime thread, as everywhere in the suite."""
    runner = NOVARunner.from_engines(request.getfixturevalue(f"{which}_engines"), backend="onnxruntime")
    assert "4 diffusion steps per launch" in runner.describe_build()
    looped, calls = launches(runner, **CASES[which])
    expected, _ = launches(per_step(runner), **CASES[which])
    assert calls["denoise_loop"] == calls["spatial"] and not calls["denoise"]
    assert np.array_equal(looped, expected)


@pytest.mark.parametrize("engines", ["t2i_engines", "t2i_fp16_engines"])
def test_loop_computes_each_modulation_once(engines, request):
    """The exported loop projects every AdaNorm's modulation (and the timestep embedding) for all its steps in
    one matrix product each, not one per step: each of those weights is read by exactly one Gemm / MatMul."""
    folder = request.getfixturevalue(engines)
    model = onnx.load(str(folder / "denoise_loop.onnx"), load_external_data=False)
    producers = {out: node for node in model.graph.node for out in node.output}
    initializers = {i.name for i in model.graph.initializer}

    def source(value: str) -> str:
        """The initializer a value comes from through layout and type nodes (or the value itself)."""
        while value in producers and producers[value].op_type in ("Transpose", "Cast", "Identity"):
            value = producers[value].input[0]
        return value

    readers = Counter(source(i) for node in model.graph.node if node.op_type in ("Gemm", "MatMul")
                      for i in node.input[:2])
    weights = [f"module.head.blocks.{i}.norm1.proj.weight" for i in range(2)] + [
        "module.head.norm.proj.weight", "module.head.time_cond_embed.timestep_proj.fc1.weight",
        "module.head.time_cond_embed.timestep_proj.fc2.weight"]
    assert set(weights) <= initializers  # (tiny-t2i's head has 2 blocks)
    assert {w: readers[w] for w in weights} == {w: 1 for w in weights}
    assert readers["module.head.blocks.0.proj.fc1.weight"] == 4  # the per-step network: once per step


def test_builds_unroll_the_official_step_count_by_default(tiny_t2v):
    spec = build_specs(CheckpointConfigs.read(tiny_t2v), BuildProfile(), "fp16")["denoise_loop"]
    shapes = {t.name: t.shape for t in spec.inputs}
    assert shapes["timesteps"] == (25,) and shapes["coefficients"] == (25, 6) and shapes["noise"][0] == 25
    assert spec.precision == "fp16"


def test_diffusion_steps_is_validated():
    for bad in (0, True, 2.5):
        with pytest.raises(ValueError, match="diffusion_steps must be an integer >= 1"):
            BuildProfile(diffusion_steps=bad)
