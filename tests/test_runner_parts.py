"""The runner's parts on their own terms: the build's refusals name the flag that serves the request, the
true fewest mask steps, stop signals, a stream that lets go of the runner, torch imported at load, the
video windows and the guidance plan."""

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from runtime.cancellation import Cancelled, DeadlineExceeded, StopSignal
from runtime.decoder import video_windows
from runtime.graphs.capabilities import BUILD_FLAGS
from runtime.graphs.profile import BuildProfile, fewest_mask_steps, max_tokens_per_step
from runtime.guidance_plan import GuidancePlan
from runtime.runner import NOVARunner
from runtime.schedules import mask_schedule

STEPS = dict(num_inference_steps=8, num_diffusion_steps=4)


@pytest.fixture(scope="module")
def t2i_runner(tiny_t2i):
    return NOVARunner.from_checkpoint(tiny_t2i, BuildProfile(min_mask_steps=8, diffusion_steps=4))


@pytest.fixture(scope="module")
def t2v_runner(tiny_t2v):
    return NOVARunner.from_checkpoint(tiny_t2v, BuildProfile(min_mask_steps=4, max_latent_length=9))


def _refusal(runner, **request) -> str:
    with pytest.raises(ValueError) as refused:
        runner(seed=0, **request)
    return str(refused.value)


def test_every_refusal_names_the_build_flag_that_serves_it(tiny_t2i, tiny_t2v):
    no_cfg = NOVARunner.from_checkpoint(tiny_t2i, BuildProfile(images_per_prompt=2, cfg=False, min_mask_steps=8))
    plain = NOVARunner.from_checkpoint(tiny_t2i, BuildProfile(min_mask_steps=8, diffusion_steps=4))
    renorm = NOVARunner.from_checkpoint(tiny_t2i, BuildProfile(min_mask_steps=8, diffusion_steps=4,
                                                               guidance_renorm=True))
    video = NOVARunner.from_checkpoint(tiny_t2v, BuildProfile(min_mask_steps=4, max_latent_length=3,
                                                              image_to_video=False))
    unguided = dict(guidance_scale=1, num_inference_steps=8)
    refusals = [  # (runner, request, the rebuild the refusal must name)
        (no_cfg, dict(prompt=["a", "b", "c"], **unguided), "rebuild with --prompts 3 --images-per-prompt 1"),
        (no_cfg, dict(prompt="a", num_images_per_prompt=3, **unguided), "--prompts 1 --images-per-prompt 3"),
        (no_cfg, dict(prompt=["a", "b"], **unguided), "rebuild with --prompts 2"),  # 2 x 1 fits, 2 prompts do not
        (no_cfg, dict(prompt="a", num_inference_steps=8), "rebuild without --no-cfg"),
        (no_cfg, dict(prompt="a", guidance_scale=1, num_inference_steps=4), "rebuild with --min-mask-steps 4"),
        (plain, dict(prompt="a", image_guidance_scale=1.5, **STEPS), "rebuild with --third-guidance-pass"),
        (plain, dict(prompt="a", guidance_renorm=0.5, **STEPS), "rebuild with --guidance-renorm"),
        (renorm, dict(prompt="a", guidance_renorm=0.5, num_inference_steps=8, num_diffusion_steps=3),
         "rebuild with --loop-diffusion-steps 3"),
        (video, dict(prompt="a", max_latent_length=4, num_inference_steps=4), "rebuild with --latent-capacity 4"),
        (video, dict(prompt="a", image=np.zeros((8, 8, 3), np.uint8), max_latent_length=3, num_inference_steps=4),
         "rebuild without --no-image-to-video"),
    ]
    for runner, request, rebuild in refusals:
        message = _refusal(runner, **request)
        assert "these engines were built for" in message and rebuild in message, (request, message)
    named = {flag for flag in BUILD_FLAGS.values() if any(flag in rebuild for _, _, rebuild in refusals)}
    assert named == set(BUILD_FLAGS.values())  # every flag a refusal may name was walked


def test_the_fewest_mask_steps_is_the_schedules(tiny_t2i):
    default = NOVARunner.from_checkpoint(tiny_t2i)  # min_mask_steps 64: 2 tokens per mask step of 16
    assert default.build.min_mask_steps == 12 and "num_inference_steps >= 12" in default.describe_build()
    assert "num_inference_steps >= 12" in _refusal(default, prompt="a", num_inference_steps=11)
    assert default("a", seed=0, num_inference_steps=12, num_diffusion_steps=2, output_type="latent").latents.shape[2] == 1
    for tokens in (16, 24, 256, 1440):  # every step count from the minimum on fits, none below
        n_max = max_tokens_per_step(tokens, 64)
        fewest = fewest_mask_steps(tokens, n_max)
        assert all(max(mask_schedule(tokens, k)) <= n_max for k in range(fewest, tokens + 1))
        assert max(mask_schedule(tokens, fewest - 1)) > n_max


class _CancelAtMaskStep:
    """Wraps a backend's run: at the `at`-th spatial call, another thread sets the cancel event (the run waits
    until it has, so the test does not race the scheduler), and spatial calls are counted."""

    def __init__(self, runner, at: int):
        self.run, self.at, self.spatial = runner.backend.run, at, 0
        self.cancel, self.reached = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=lambda: self.reached.wait(60) and self.cancel.set())
        self.thread.start()

    def __call__(self, graph, inputs):
        if graph == "spatial":
            self.spatial += 1
            if self.spatial == self.at:
                self.reached.set()
                self.cancel.wait(60)
        return self.run(graph, inputs)


def test_a_cancel_from_another_thread_stops_within_one_mask_step(t2i_runner, monkeypatch):
    request = dict(prompt="a lighthouse", seed=6, num_inference_steps=16, num_diffusion_steps=4)
    expected = t2i_runner(**request).latents
    spy = _CancelAtMaskStep(t2i_runner, at=3)
    monkeypatch.setattr(t2i_runner.backend, "run", spy)
    with pytest.raises(Cancelled, match="the request was cancelled"):
        t2i_runner(**request, stop=StopSignal(spy.cancel))
    spy.thread.join(60)
    assert spy.spatial == 3  # mask step 3 finished, step 4 did not start (16 were asked for)
    monkeypatch.undo()
    assert np.array_equal(t2i_runner(**request).latents, expected)  # ready at once, nothing left half-set


def test_a_past_deadline_stops_before_any_graph_runs(t2i_runner, monkeypatch):
    calls = []
    run = t2i_runner.backend.run
    monkeypatch.setattr(t2i_runner.backend, "run", lambda graph, inputs: calls.append(graph) or run(graph, inputs))
    with pytest.raises(DeadlineExceeded, match="ran past its deadline"):
        t2i_runner("a", seed=0, stop=StopSignal.after(-1), **STEPS)
    assert calls == []
    assert t2i_runner("a", seed=0, stop=StopSignal.after(60), **STEPS).images.shape == (1, 64, 64, 3)


def test_a_stream_cancelled_between_video_windows_stops_and_frees_the_runner(t2v_runner, monkeypatch):
    request = dict(prompt="a bird", seed=1, num_inference_steps=4, num_diffusion_steps=1, max_latent_length=9)
    cancel, calls = threading.Event(), []
    run = t2v_runner.backend.run
    monkeypatch.setattr(t2v_runner.backend, "run", lambda graph, inputs: calls.append(graph) or run(graph, inputs))
    stream = t2v_runner.stream(**request, stop=StopSignal(cancel))
    assert next(stream).shape[1] == 17  # the first window: latents 0..4
    cancel.set()
    before = len(calls)
    with pytest.raises(Cancelled):
        next(stream)
    assert "spatial" not in calls[before:]  # frame 5's first mask step saw the signal
    monkeypatch.undo()
    assert t2v_runner(**{**request, "max_latent_length": 1}).frames.shape[1] == 1


@pytest.mark.parametrize("let_go", ["close", "del"])
def test_an_abandoned_stream_frees_the_runner_at_once(t2i_runner, let_go):
    stream = t2i_runner.stream("a bird", seed=1, **STEPS)
    image = next(stream)
    assert t2i_runner._lock.locked()  # held while the stream is open
    if let_go == "close":
        stream.close()
    else:
        del stream
    assert not t2i_runner._lock.locked()
    assert np.array_equal(t2i_runner("a bird", seed=1, **STEPS).images, image)


def test_torch_is_imported_when_the_runner_is_made(t2i_engines):
    """The seeded draws need torch where it is installed: its import (~1 s) belongs to loading, not to the
    first request's generation time."""
    code = ("import sys\nfrom runtime.runner import NOVARunner\nassert 'torch' not in sys.modules\n"
            "NOVARunner.from_engines(sys.argv[1], backend='onnxruntime')\nprint('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code, str(t2i_engines)], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"


@pytest.mark.parametrize("latents, windows", [(1, [(0, 1)]), (2, [(0, 2)]), (5, [(0, 5)]), (6, [(0, 5)]),
                                              (9, [(0, 5), (4, 9)]), (17, [(0, 5), (4, 9), (8, 13), (12, 17)])])
def test_video_windows_are_the_official_tiling(latents, windows):
    assert [(w.start, w.stop) for w in video_windows(latents)] == windows


def test_guidance_plan_rows_and_blocks():
    assert GuidancePlan(5.0).text_blocks(3) == ("cond", "uncond", "cond")  # plain CFG on a three-block build
    assert GuidancePlan(5.0, image_scale=1.5).text_blocks(3) == ("cond", "uncond", "uncond")
    assert GuidancePlan(1.0).text_blocks(2) == ("cond", "uncond") and GuidancePlan(1.0).passes == 1
    assert GuidancePlan(5.0, image_scale=1.5).raw_bos(3, 2).tolist() == [False, False, True, True, False, False]
    assert not GuidancePlan(5.0, spatiotemporal_scale=1.5).raw_bos(3, 2).any()
    assert GuidancePlan(1.0, image_scale=1.5).passes == 1  # unguided: no third pass either
