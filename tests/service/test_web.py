"""What users of the service expect beyond the plain API (serve/): the OpenAI images API through the real
`openai` client, image progress streams, video jobs (polled, cancelled), image-to-video over HTTP, and the
web demo at / in a real browser (Debian's chromium driven by playwright).

On the package's Ray instance (conftest.py: the "nova" application over a batch-4 tiny-t2i folder and a
tiny-t2v folder with a 9-latent cache, shared with test_api.py). Every served result is compared with a direct
NOVARunner call.
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import io
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import pytest
import requests
from PIL import Image

from runtime import NOVARunner
from tests.service.apps import MAX_JOBS, TIMEOUT, assert_encodes, events, pixels, post

STEPS = dict(num_inference_steps=8, num_diffusion_steps=4)
VIDEO = dict(max_latent_length=9, num_inference_steps=4, num_diffusion_steps=4)
# A video job long enough to cancel midway: per-step graphs (the build unrolls 4 diffusion steps), 9 x 64
# mask steps of 200 diffusion steps each.
LONG_VIDEO = dict(max_latent_length=9, num_inference_steps=64, num_diffusion_steps=200)
# The longest image the tiny engines take: a mask step per token (16), each of 1000 diffusion steps (the cap).
LONG_IMAGE = dict(num_inference_steps=64, num_diffusion_steps=1000)
CHROMIUM = "/usr/bin/chromium"
# NOVA_SCREENSHOTS=serve/demo: the browser tests save the screenshots of serve/README.md there
SCREENSHOTS = os.environ.get("NOVA_SCREENSHOTS")
T = TypeVar("T")


@pytest.fixture(scope="module")
def image_runner(t2i_b4_engines):
    return NOVARunner.from_engines(t2i_b4_engines)


@pytest.fixture(scope="module")
def video_runner(t2v_engines):
    return NOVARunner.from_engines(t2v_engines)


def eventually(read: Callable[[], T], until: Callable[[T], bool], what: str) -> T:
    """`read()` once `until` holds for it, polled (bounded by TIMEOUT)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        value = read()
        if until(value):
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} never came: {value}")


def poll(server: str, job_id: str, until: Callable[[dict], bool]) -> dict:
    """The job's state once `until(state)` holds (bounded by TIMEOUT)."""
    return eventually(lambda: requests.get(f"{server}/v1/videos/jobs/{job_id}", timeout=TIMEOUT).json(), until,
                      f"the awaited state of job {job_id}")


def stats(folder: Path) -> dict:
    """The counts of the model's replica (`NOVAModel.stats`). Asked from a thread of its own: playwright's sync API
    runs an asyncio loop in the test's thread, where Ray's handles refuse to wait."""
    from ray import serve

    from serve.app import model_id

    handle = serve.get_deployment_handle(model_id(folder), app_name="nova")
    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        return thread.submit(lambda: handle.stats.remote().result(timeout_s=TIMEOUT)).result()


def stopped(folder: Path, before: dict) -> dict:
    """The replica's counts once one more of its runner calls has stopped before its end than in `before`: a
    stopped call has left the runner, which is free for the next request."""
    return eventually(lambda: stats(folder), lambda now: now["stopped"] > before["stopped"],
                      f"a stopped runner call of {folder.name}")


def window_frames(window: dict) -> np.ndarray:
    """The frames of a `window` event, uint8 [B, T, H, W, 3]."""
    return np.frombuffer(base64.b64decode(window["frames"]), np.uint8).reshape(window["shape"])


def jpeg(height: int, width: int) -> bytes:
    """A JPEG of random pixels."""
    picture = (np.random.default_rng(0).random((height, width, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="JPEG")
    return buffer.getvalue()


def forget(server: str, job_id: str) -> None:
    """Cancel a job if it is still queued or running (the first DELETE), then delete it (the next)."""
    for _ in range(2):
        requests.delete(f"{server}/v1/videos/jobs/{job_id}", timeout=TIMEOUT)
    assert requests.get(f"{server}/v1/videos/jobs/{job_id}", timeout=TIMEOUT).status_code == 404


# -- the OpenAI images API -----------------------------------------------------------------------------------


def test_openai_client_images_generate_equals_direct_call(server, image_runner, t2i_b4_engines):
    openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install -e '.[test]')")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)
    one = client.images.generate(prompt="a red bicycle", size="64x64", response_format="b64_json",
                                 extra_body={"seed": 3, **STEPS})
    np.testing.assert_array_equal(pixels(base64.b64decode(one.data[0].b64_json)),
                                  image_runner("a red bicycle", seed=3, **STEPS).images[0])
    two = client.images.generate(model=t2i_b4_engines.name, prompt="a lighthouse", n=2,
                                 extra_body={"seed": 5, "negative_prompt": "fog", "guidance_scale": 3.0, **STEPS})
    direct = image_runner("a lighthouse", seed=5, negative_prompt="fog", guidance_scale=3.0, num_images_per_prompt=2,
                          **STEPS)
    np.testing.assert_array_equal(np.stack([pixels(base64.b64decode(d.b64_json)) for d in two.data]), direct.images)
    assert two.created > 0 and len(two.data) == 2


@pytest.mark.parametrize("body, message", [
    ({"size": "1024x1024"}, "size '1024x1024' is not served: model 't2i-b4' generates 64x64 images"),
    ({"response_format": "url"}, "response_format 'url' is not served: this service hosts no files"),
    ({"num_images_per_prompt": 2}, "give the number of images as n"),
    ({"num_inference_steps": 2}, "num_inference_steps"),  # the runner's refusal (below the build's minimum)
])
def test_openai_refusals_are_one_sentence(server, body, message):
    response = post(f"{server}/v1/images/generations", {"prompt": "a cat", **body})
    assert response.status_code == 400 and message in response.json()["error"]


# -- progress ----------------------------------------------------------------------------------------------------


def test_image_stream_reports_every_mask_step_then_the_image(server, image_runner):
    with post(f"{server}/v1/images?stream=true", {"prompt": "a kite", "seed": 7, **STEPS}, stream=True) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        received = events(response)
    steps: list = []
    direct = image_runner("a kite", seed=7, on_step=steps.append, **STEPS)
    assert [name for name, _ in received] == ["progress"] * len(steps) + ["done"]
    assert [data for _, data in received[:-1]] == [dataclasses.asdict(step) for step in steps]
    np.testing.assert_array_equal(pixels(base64.b64decode(received[-1][1]["images"][0])), direct.images[0])


def test_leaving_an_image_stream_frees_the_replica(server, image_runner, t2i_b4_engines):
    """A client that goes away after the first progress event stops the runner at its next mask step: its call
    ends stopped (not finished), and the next request is answered."""
    before = stats(t2i_b4_engines)
    body = {"prompt": "a storm", "seed": 1, **LONG_IMAGE}
    with post(f"{server}/v1/images?stream=true", body, stream=True) as response:
        assert next(response.iter_lines()) == b"event: progress"
    stopped(t2i_b4_engines, before)
    answer = post(f"{server}/v1/images", {"prompt": "a kite", "seed": 7, **STEPS})
    assert answer.status_code == 200
    np.testing.assert_array_equal(pixels(answer.content), image_runner("a kite", seed=7, **STEPS).images[0])


def test_video_stream_interleaves_progress_with_its_windows(server, video_runner):
    """Every mask step's progress, in order, rising to the total; each window right after the progress of its
    last latent frame (17 frames: 5 latents, then 16 per 4), before any later frame's; the windows' frames are
    the blocking call's video."""
    with post(f"{server}/v1/videos?stream=true", {"prompt": "waves on a beach", "seed": 3, **VIDEO},
              stream=True) as response:
        received = events(response)
    steps: list = []
    direct = video_runner("waves on a beach", seed=3, on_step=steps.append, **VIDEO)
    progress = [data for name, data in received if name == "progress"]
    assert progress == [dataclasses.asdict(step) for step in steps]
    assert [p["mask_steps_done"] for p in progress] == list(range(1, 9 * 4 + 1)) and progress[-1]["frames_done"] == 9
    windows = []
    for at, (name, data) in enumerate(received):
        if name == "window":
            latents = 1 + (data["start"] + data["shape"][1] - 1) // 4  # the latent frames its pixels need
            assert received[at - 1] == ("progress", {"frames_done": latents, "frames": 9,
                                                     "mask_steps_done": latents * 4, "mask_steps": 36})
            windows.append(window_frames(data))
    assert [name for name, _ in received if name != "progress"] == ["window", "window", "done"]
    assert received[-1] == ("done", {"frames": 33})
    np.testing.assert_array_equal(np.concatenate(windows, axis=1), direct.frames)


# -- video jobs ----------------------------------------------------------------------------------------------------


def test_video_job_polled_to_done_gives_the_blocking_calls_video(server, video_runner, tmp_path):
    body = {"prompt": "waves on a beach", "seed": 3, "fps": 8, **VIDEO}
    created = post(f"{server}/v1/videos/jobs", body).json()
    assert created["status"] in ("queued", "running") and created["id"].startswith("video_")
    done = poll(server, created["id"], lambda state: state["status"] not in ("queued", "running"))
    assert done["status"] == "done", done
    assert done["progress"] == {"frames_done": 9, "frames": 9, "mask_steps_done": 36, "mask_steps": 36}
    assert done["running_s"] > 0 and done["finished_at"] >= done["started_at"] >= done["created_at"]
    content = requests.get(f"{server}/v1/videos/jobs/{created['id']}/content", timeout=TIMEOUT)
    assert content.headers["content-type"] == "video/mp4"
    frames = video_runner(body["prompt"], seed=3, **VIDEO).frames[0]
    assert_encodes(content.content, frames, 8, tmp_path)  # the frames of the direct call, as the blocking call's
    assert_encodes(post(f"{server}/v1/videos", body).content, frames, 8, tmp_path)
    gone = requests.delete(f"{server}/v1/videos/jobs/{created['id']}", timeout=TIMEOUT)
    assert gone.json()["status"] == "done"
    assert requests.get(f"{server}/v1/videos/jobs/{created['id']}", timeout=TIMEOUT).status_code == 404


def test_cancelled_job_frees_the_replica_and_queued_jobs_have_a_position(server, video_runner):
    long = post(f"{server}/v1/videos/jobs", {"prompt": "a storm", "seed": 1, **LONG_VIDEO}).json()
    queued = post(f"{server}/v1/videos/jobs", {"prompt": "a calm sea", "seed": 2, **VIDEO}).json()
    assert queued["status"] == "queued" and queued["queue_position"] == 0  # behind the long one, first in line
    poll(server, long["id"], lambda state: (state["progress"] or {}).get("mask_steps_done", 0) >= 1)
    cancelled = requests.delete(f"{server}/v1/videos/jobs/{long['id']}", timeout=TIMEOUT).json()
    assert cancelled["status"] == "cancelled" and cancelled["progress"]["mask_steps_done"] < 9 * 64
    # The replica is free: the queued job's runner call waits only for the cancelled one's current mask step
    # (the runner checks its stop at every step), not for the hundreds of steps left.
    done = poll(server, queued["id"], lambda state: state["status"] not in ("queued", "running"))
    steps = cancelled["progress"]
    left_s = (steps["mask_steps"] - steps["mask_steps_done"]) * cancelled["running_s"] / steps["mask_steps_done"]
    assert done["status"] == "done" and done["running_s"] < left_s / 2, (done, left_s)


def test_job_refusals(server):
    refused = post(f"{server}/v1/videos/jobs", {"prompt": "x", "max_latent_length": 10})
    assert refused.status_code == 200  # the job takes it; the runner's refusal is the job's error
    failed = poll(server, refused.json()["id"], lambda state: state["status"] == "failed")
    assert "max_latent_length" in failed["error"]
    content = requests.get(f"{server}/v1/videos/jobs/{failed['id']}/content", timeout=TIMEOUT)
    assert content.status_code == 409 and "failed, not done" in content.json()["error"]
    assert requests.get(f"{server}/v1/videos/jobs/video_nope", timeout=TIMEOUT).status_code == 404


def test_jobs_are_bounded_in_number(server):
    """The app holds MAX_JOBS jobs; finished ones count until deleted or expired."""
    created, answer = [], None
    for _ in range(MAX_JOBS + 1):
        answer = post(f"{server}/v1/videos/jobs", {"prompt": "a wave", "seed": 0, **VIDEO})
        if answer.status_code != 200:
            break
        created.append(answer.json()["id"])
    assert answer.status_code == 429 and answer.json()["error"] == (
        f"the service holds its {MAX_JOBS} jobs already (finished ones are kept 600 s, or until deleted); retry later")
    for job_id in created:
        forget(server, job_id)
    room = post(f"{server}/v1/videos/jobs", {"prompt": "a wave", **VIDEO})
    assert room.status_code == 200
    forget(server, room.json()["id"])


# -- image-to-video ------------------------------------------------------------------------------------------------


def test_image_to_video_over_http_equals_the_direct_call(server, video_runner):
    """A 96x48 JPEG, as a base64 field and as a multipart file: the runner fits it to the model's 96x64 as it fits
    the same picture given directly."""
    picture = jpeg(48, 96)
    options = dict(max_latent_length=3, num_inference_steps=4, num_diffusion_steps=4)
    body = {"prompt": "a cat walks", "seed": 4, **options}
    direct = video_runner("a cat walks", seed=4, image=np.asarray(Image.open(io.BytesIO(picture))), **options).frames
    with post(f"{server}/v1/videos?stream=true", {**body, "image": base64.b64encode(picture).decode()},
              stream=True) as response:
        windows = [data for name, data in events(response) if name == "window"]
    np.testing.assert_array_equal(window_frames(windows[0]), direct)
    parts = {"request": (None, json.dumps(body)), "image": ("cat.jpg", picture, "image/jpeg")}
    with requests.post(f"{server}/v1/videos?stream=true", files=parts, timeout=TIMEOUT, stream=True) as response:
        windows = [data for name, data in events(response) if name == "window"]
    np.testing.assert_array_equal(window_frames(windows[0]), direct)
    broken = post(f"{server}/v1/videos", {**body, "image": "bm90IGEgcGljdHVyZQ=="})
    assert broken.status_code == 400
    assert broken.json()["error"] == "image must be a PNG or JPEG, and its bytes are neither"


@pytest.mark.parametrize("path", ["/v1/videos", "/v1/videos/jobs"])
@pytest.mark.parametrize("parts, status, message", [
    ({"request": (None, '{"prompt": "a cat"}'), "image": ("notes.txt", b"not a picture", "text/plain")}, 400,
     "image must be a PNG or JPEG, and its bytes are neither"),
    ({"request": (None, '{"prompt": "a cat"}'), "image": (None, "iVBORw0KGgo=")}, 422,
     "the 'image' part must be a file (a PNG or JPEG), not a text field"),
    ({"image": ("cat.jpg", b"", "image/jpeg")}, 422, "a multipart video request has a 'request' part (its JSON)"),
    ({"request": (None, '{"prompt": "a cat", "image": "iVBORw0KGgo="}'), "image": ("cat.jpg", b"", "image/jpeg")},
     422, "give the image prompt once: as the 'image' part or as the request's image field"),
    ({"request": (None, '{"prompt": "a cat", "colour": 1}')}, 422,
     "colour: Extra inputs are not permitted (unknown field)"),
])
def test_multipart_refusals_are_one_sentence(server, path, parts, status, message):
    response = requests.post(f"{server}{path}", files=parts, timeout=TIMEOUT)
    assert response.status_code == status and list(response.json()) == ["error"], response.text
    assert message in response.json()["error"]


# -- the web demo in a real browser --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def page(server):
    if shutil.which(CHROMIUM) is None:
        pytest.skip(f"no {CHROMIUM} (apt-get install -y chromium; .ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed (pip install -e '.[test]')")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(server)
        page.wait_for_selector("body[data-ready=true]", timeout=TIMEOUT * 1000)
        yield page
        browser.close()


def shown(page) -> dict:
    """What the video tab shows now, read at one instant: frames received and shown so far, the index of the frame
    on the (first) canvas and its RGB pixels, and the progress bar's value and maximum."""
    state = page.evaluate("""() => {
        const results = document.getElementById("video-results"), canvas = results.querySelector("canvas");
        const bar = document.getElementById("video-progress");
        const image = canvas && canvas.dataset.frame !== undefined
            ? canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height) : null;
        return {received: Number(results.dataset.received), shown: Number(results.dataset.shown),
                frame: image && Number(canvas.dataset.frame), progress: bar.value, total: bar.max,
                size: image && [image.height, image.width], pixels: image && Array.from(image.data)}; }""")
    if state["pixels"] is not None:
        state["pixels"] = np.array(state["pixels"], np.uint8).reshape(*state["size"], 4)[..., :3]
    return state


def wait(page, condition: str) -> None:
    """Until the JavaScript expression `condition` holds in the page (polled every 100 ms, not at every animation
    frame: the browser shares the 2 cores with the replicas; bounded by TIMEOUT)."""
    page.wait_for_function(condition, polling=100, timeout=TIMEOUT * 1000)


def screenshot(page, name: str) -> None:
    if SCREENSHOTS:
        page.screenshot(path=str(Path(SCREENSHOTS) / f"{name}.png"), full_page=True)


def test_demo_generates_the_direct_calls_image(page, image_runner):
    page.click("#tab-image")
    page.fill("#image-prompt", "a watercolor fox")
    page.fill("#image-seed", "11")
    page.fill("#image-mask-steps", "8")
    page.fill("#image-diffusion-steps", "4")
    page.click("#image-generate")
    shown_image = page.wait_for_selector("#image-results img", timeout=TIMEOUT * 1000)
    png = base64.b64decode(shown_image.get_attribute("src").removeprefix("data:image/png;base64,"))
    np.testing.assert_array_equal(pixels(png), image_runner("a watercolor fox", seed=11, **STEPS).images[0])
    assert page.text_content("#image-status") == "done: 1 image(s), seed 11"
    screenshot(page, "text-to-image")
    page.fill("#image-mask-steps", "2")  # below the build's minimum: the runner's sentence is shown
    page.click("#image-generate")
    page.wait_for_selector("#image-status.refused", timeout=TIMEOUT * 1000)
    assert "num_inference_steps" in page.text_content("#image-status")


def test_demo_cancels_an_image_midway(page, t2i_b4_engines):
    """Cancel after the first progress closes the stream: the replica's runner call ends stopped, and the next
    image is answered."""
    page.click("#tab-image")
    page.fill("#image-prompt", "a storm")
    page.fill("#image-mask-steps", str(LONG_IMAGE["num_inference_steps"]))
    page.fill("#image-diffusion-steps", str(LONG_IMAGE["num_diffusion_steps"]))
    before = stats(t2i_b4_engines)
    page.click("#image-generate")
    wait(page, "document.getElementById('image-progress').value >= 1")
    page.click("#image-cancel")
    wait(page, "document.getElementById('image-status').textContent === 'cancelled'")
    stopped(t2i_b4_engines, before)
    assert page.eval_on_selector("#image-results", "results => results.children.length") == 0
    page.fill("#image-mask-steps", "8")
    page.fill("#image-diffusion-steps", "4")
    page.click("#image-generate")
    wait(page, "document.getElementById('image-status').textContent.startsWith('done')")


def fill_video(page, prompt: str, **fields: int) -> None:
    page.click("#tab-video")
    page.fill("#video-prompt", prompt)
    page.fill("#video-seed", "0")
    for field, value in fields.items():
        page.fill(f"#video-{field.replace('_', '-')}", str(value))


def test_demo_plays_the_video_as_it_streams_and_cancels_midway(page, t2v_engines, server):
    """The first window's frames play on the canvas while later latent frames are still being generated (that
    they are the runner's pixels: the next test); cancel then closes the stream: the replica's runner call ends
    stopped, and the next video is answered."""
    # a mask step per token (24) of 200 diffusion steps (the per-step graphs): the first window comes after 5 latent
    # frames, and the other 4 take seconds more, in which the page shows frames and the cancel lands (at the built
    # 4 diffusion steps they took well under a second, and a loaded CI run saw the video end before the cancel)
    fill_video(page, "a storm at sea", latents=9, mask_steps=24, diffusion_steps=200)
    before = stats(t2v_engines)
    page.click("#video-generate")
    wait(page, "Number(document.getElementById('video-results').dataset.shown) >= 1")
    now = shown(page)
    counts = {key: now[key] for key in ("received", "shown", "progress", "total")}
    assert now["received"] == 17 and now["shown"] >= 1 and now["progress"] < now["total"], counts
    page.click("#video-cancel")
    wait(page, "document.getElementById('video-status').textContent === 'cancelled'")
    stopped(t2v_engines, before)
    assert shown(page)["progress"] < now["total"]
    short = dict(max_latent_length=1, num_inference_steps=4, num_diffusion_steps=4)
    assert post(f"{server}/v1/videos", {"prompt": "waves", "seed": 4, **short}).status_code == 200


def test_demo_sends_the_image_prompt_as_a_file(page, video_runner, tmp_path):
    """The image prompt goes as a multipart file part; the canvas plays the direct call's frames."""
    (tmp_path / "cat.jpg").write_bytes(jpeg(48, 96))
    fill_video(page, "a cat walks", latents=3, mask_steps=4, diffusion_steps=4)
    page.set_input_files("#video-image", str(tmp_path / "cat.jpg"))
    with page.expect_request("**/v1/videos?stream=true") as sent:
        page.click("#video-generate")
    assert sent.value.headers["content-type"].startswith("multipart/form-data")
    wait(page, "document.getElementById('video-status').textContent.startsWith('done')")
    assert page.text_content("#video-status") == "done: 9 frame(s), seed 0"
    now = shown(page)
    direct = video_runner("a cat walks", seed=0, image=np.asarray(Image.open(tmp_path / "cat.jpg")),
                          guidance_scale=5.0, motion_flow=5.0, max_latent_length=3, num_inference_steps=4,
                          num_diffusion_steps=4).frames
    assert now["received"] == 9
    np.testing.assert_array_equal(now["pixels"], direct[0, now["frame"]])
    screenshot(page, "text-to-video")
    page.set_input_files("#video-image", [])
