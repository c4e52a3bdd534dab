"""The Ray Serve application (serve/) on a local Ray instance over tiny engine folders, loopback only.

One Ray instance and one application per module: a batch-4 tiny-t2i folder and a tiny-t2v folder with a
9-latent cache (two decoded windows). Every served result is compared with a direct NOVARunner call.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import socket
import time

import numpy as np
import pytest
import torch

from runtime import NOVARunner
from runtime.draws import PerRowDraws
from runtime.media import read_mp4, write_mp4

STEPS = dict(num_inference_steps=8, num_diffusion_steps=4)
VIDEO = dict(max_latent_length=9, num_inference_steps=4, num_diffusion_steps=4)
TIMEOUT = 60  # seconds, any one HTTP exchange


@pytest.fixture(scope="module")
def one_thread():
    """Replicas and direct runners alike run ONNX Runtime on one thread (2 shared cores)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NOVA_ORT_THREADS", "1")
        yield


@pytest.fixture(scope="session")
def t2i_b4(t2i_b4_engines):
    return t2i_b4_engines


@pytest.fixture(scope="session")
def t2v9(t2v_engines):
    return t2v_engines


@pytest.fixture(scope="module")
def image_runner(t2i_b4, one_thread):
    return NOVARunner.from_engines(t2i_b4)


@pytest.fixture(scope="module")
def server(t2i_b4, t2v9, one_thread):
    """Base URL of the application on a local Ray instance (2 CPUs, no dashboard), 127.0.0.1 only."""
    ray = pytest.importorskip("ray", reason="ray[serve] is not installed (pip install -e '.[serve]')")
    from ray import serve

    from serve.app import build_app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # 0.2 s of batch wait: on 2 shared cores (and beside another test worker) concurrent requests arrive
        # spread out; batches still fill
        serve.run(build_app([str(t2i_b4), str(t2v9)], batch_wait_s=0.2, env={"NOVA_ORT_THREADS": "1"}), name="nova",
                  route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def post(url: str, body: dict, **kwargs):
    import requests

    return requests.post(url, data=json.dumps(body), headers={"content-type": "application/json"},
                         timeout=TIMEOUT, **kwargs)


def png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)))


def stats(folder) -> dict:
    from ray import serve

    from serve.app import model_id

    return serve.get_deployment_handle(model_id(folder), app_name="nova").stats.remote().result(timeout_s=TIMEOUT)


def test_per_row_draws_equal_calls_of_their_own(image_runner):
    """Row i of a batched call with PerRowDraws is bit for bit the call of its own with seed i (padded rows too)."""
    prompts, seeds = ["a fox", "a cat on a mat", "waves"], [11, 12, 13]
    batched = image_runner(prompts, draws=PerRowDraws([torch.Generator().manual_seed(s) for s in seeds]), **STEPS)
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        alone = image_runner(prompt, seed=seed, **STEPS)
        np.testing.assert_array_equal(batched.latents[i], alone.latents[0])
        np.testing.assert_array_equal(batched.images[i], alone.images[0])


def test_health_and_models(server):
    import requests

    health = requests.get(f"{server}/healthz", timeout=TIMEOUT)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    models = {m["id"]: m for m in requests.get(f"{server}/v1/models", timeout=TIMEOUT).json()["models"]}
    assert models["t2i-b4"]["kind"] == "image" and models["t2i-b4"]["batch"] == 4
    assert models["t2i-b4"]["build"].startswith("4 image(s) per call (4 prompt(s) x 1), CFG on")
    assert models["t2v9"]["kind"] == "video" and models["t2v9"]["max_latent_length"] == 9


def test_image_matches_direct_call(server, image_runner):
    response = post(f"{server}/v1/images", {"prompt": "a lighthouse at dusk", "seed": 42, **STEPS})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png", response.text
    np.testing.assert_array_equal(png(response.content), image_runner("a lighthouse at dusk", seed=42, **STEPS).images[0])


def test_official_options_of_the_runner_are_served(server, image_runner):
    body = {"prompt": "a lighthouse at dusk", "seed": 7, "guidance_trunc": 600.0, "flow_shift": 3.0, **STEPS}
    response = post(f"{server}/v1/images", body)
    assert response.status_code == 200, response.text
    direct = image_runner("a lighthouse at dusk", seed=7, guidance_trunc=600.0, flow_shift=3.0, **STEPS).images[0]
    np.testing.assert_array_equal(png(response.content), direct)
    assert not np.array_equal(direct, image_runner("a lighthouse at dusk", seed=7, **STEPS).images[0])


def test_several_images_as_json(server, image_runner):
    """Two images of one prompt: not batched with others, one call of its own, JSON with base64 PNGs."""
    body = {"prompt": "a red kite", "seed": 5, "num_images_per_prompt": 2, "negative_prompt": "blur", **STEPS}
    response = post(f"{server}/v1/images", body)
    assert response.status_code == 200
    served = [png(base64.b64decode(image)) for image in response.json()["images"]]
    direct = image_runner("a red kite", seed=5, num_images_per_prompt=2, negative_prompt="blur", **STEPS).images
    np.testing.assert_array_equal(np.stack(served), direct)


def test_streamed_video_matches_direct_stream(server, t2v9, tmp_path):
    """Two windows (17 + 16 frames) arrive as separate events, bit for bit the runner's stream; the MP4 endpoint
    encodes the same frames."""
    runner = NOVARunner.from_engines(t2v9)
    direct = list(runner.stream("waves on a beach", seed=3, **VIDEO))
    with post(f"{server}/v1/videos?stream=true", {"prompt": "waves on a beach", "seed": 3, **VIDEO},
              stream=True) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [(block.split("\n")[0].removeprefix("event: "), json.loads(block.split("\n")[1].removeprefix("data: ")))
                  for block in response.text.strip().split("\n\n")]
    assert [name for name, _ in events] == ["window", "window", "done"] and events[-1][1] == {"frames": 33}
    for (_, window), expected in zip(events, direct):
        assert window["shape"] == list(expected.shape)
        frames = np.frombuffer(base64.b64decode(window["frames"]), np.uint8).reshape(window["shape"])
        np.testing.assert_array_equal(frames, expected)

    response = post(f"{server}/v1/videos", {"prompt": "waves on a beach", "seed": 3, "fps": 8, **VIDEO})
    assert response.status_code == 200 and response.headers["content-type"] == "video/mp4"
    # H.264 is lossy and libx264's bitstream depends on its thread count, which differs between processes:
    # the served video must be as close to the frames as the same frames encoded here.
    frames = np.concatenate(direct, axis=1)[0]
    (tmp_path / "served.mp4").write_bytes(response.content)
    served, here = read_mp4(tmp_path / "served.mp4"), read_mp4(write_mp4(frames, tmp_path / "direct.mp4", fps=8))
    assert served.shape == here.shape == frames.shape
    served_psnr, here_psnr = _psnr(served, frames), _psnr(here, frames)
    assert served_psnr > here_psnr - 0.5, (served_psnr, here_psnr)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255 ** 2 / np.mean((a.astype(np.float64) - b) ** 2)))


def test_load_batches_and_every_response_is_correct(server, t2i_b4, image_runner):
    """32 concurrent requests, 32 seeds: each response equals its direct call; batches of up to 4 make at
    most a third as many runner calls as requests."""
    count, prompts = 32, ["a fox", "a cat", "a boat", "a tree"]
    bodies = [{"prompt": prompts[i % 4], "seed": 100 + i, **STEPS} for i in range(count)]
    before = stats(t2i_b4)
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        responses = list(pool.map(lambda body: post(f"{server}/v1/images", body), bodies, timeout=4 * TIMEOUT))
    after = stats(t2i_b4)
    assert [r.status_code for r in responses] == [200] * count
    assert after["requests"] - before["requests"] == count
    calls = after["runner_calls"] - before["runner_calls"]
    assert calls <= count / 3, f"{calls} runner calls for {count} requests"
    for body, response in zip(bodies, responses):
        np.testing.assert_array_equal(png(response.content),
                                      image_runner(body["prompt"], seed=body["seed"], **STEPS).images[0])


@pytest.mark.parametrize("path, body, status, message", [
    ("/v1/images", {"prompt": "a", "sed": 1}, 422, "sed: Extra inputs are not permitted (unknown field)"),
    ("/v1/images", {"prompt": "a", "seed": "1"}, 422, "seed: Input should be a valid integer"),
    ("/v1/images", {"prompt": 3}, 422, "prompt.str: Input should be a valid string"),
    ("/v1/images", {"prompt": "a", "seed": -1}, 422, "seed: Input should be greater than or equal to 0"),
    ("/v1/images", {"prompt": "a", "num_inference_steps": 4}, 400,
     "num_inference_steps 4 predicts up to 6 tokens in one step; these engines were built for 4 image(s) per call"),
    ("/v1/images", {"prompt": "a", **STEPS, "num_diffusion_steps": 0}, 400, "num_diffusion_steps must be an integer >= 1"),
    ("/v1/images", {"prompt": ["a"] * 5, **STEPS}, 400, "5 prompt(s) x 1 image(s) = 5 images per call"),
    ("/v1/images", {"prompt": "a", "num_images_per_prompt": 5, **STEPS}, 400, "= 5 images per call"),
    ("/v1/images", {"prompt": "a", "model": "t2v9"}, 404, "model 't2v9' generates videos, not images"),
    ("/v1/videos", {"prompt": "a", "max_latent_length": 10}, 400, "max_latent_length 10 exceeds the KV cache"),
    ("/v1/videos?stream=true", {"prompt": "a", "num_diffusion_steps": 0}, 400,
     "num_diffusion_steps must be an integer >= 1, got 0"),
])
def test_bad_requests_get_4xx_with_the_refusal(server, path, body, status, message):
    response = post(f"{server}{path}", body)
    assert response.status_code == status and message in response.json()["error"], response.text


def test_incompatible_requests_are_not_mixed(server, image_runner):
    """Concurrent single-image requests with other options (guidance, negative prompt, a refused step count) go
    into separate runner calls: each good one equals its direct call, the refused one alone gets 400."""
    bodies = [{"prompt": "a", "seed": 1, **STEPS}, {"prompt": "b", "seed": 2, "num_inference_steps": 2},
              {"prompt": "c", "seed": 3, "guidance_scale": 3.0, **STEPS},
              {"prompt": "d", "seed": 4, "negative_prompt": "fog", **STEPS}]
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda body: post(f"{server}/v1/images", body), bodies, timeout=TIMEOUT))
    assert [r.status_code for r in responses] == [200, 400, 200, 200]
    for body, response in zip(bodies, responses):
        if response.status_code == 200:
            np.testing.assert_array_equal(png(response.content), image_runner(**body).images[0])


def test_killed_replica_gives_503_then_recovers(server, t2i_b4, image_runner):
    """A replica killed during a long request: the client gets 503 or the correct result (Ray Serve re-sends it
    to the restarted replica) within a bounded time, and the next requests succeed."""
    import ray

    from serve.app import model_id

    long = {"prompt": "a slow one", "seed": 9, "num_inference_steps": 16, "num_diffusion_steps": 400}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post, f"{server}/v1/images", long)
        time.sleep(1.0)  # the request is now being generated (about 2.5 s of work)
        replicas = [actor for actor in ray.util.list_named_actors(all_namespaces=True)
                    if actor["namespace"] == "serve" and f"#{model_id(t2i_b4)}#" in actor["name"]]
        assert len(replicas) == 1, replicas
        started = time.monotonic()
        ray.kill(ray.get_actor(replicas[0]["name"], namespace="serve"), no_restart=True)
        response = pending.result(timeout=TIMEOUT)
    assert time.monotonic() - started < 30  # observed: 6-8 s (a retry on the restarted replica)
    if response.status_code == 503:
        assert "replica serving this request stopped" in response.json()["error"]
    else:
        assert response.status_code == 200
        np.testing.assert_array_equal(png(response.content), image_runner(**long).images[0])
    body = {"prompt": "after the restart", "seed": 10, **STEPS}
    response = post(f"{server}/v1/images", body)
    assert response.status_code == 200
    np.testing.assert_array_equal(png(response.content), image_runner("after the restart", seed=10, **STEPS).images[0])
