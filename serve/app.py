"""The Ray Serve application: one `NOVAModel` deployment per engine folder behind an HTTP `Ingress`.

    client --HTTP--> Ray Serve proxy --> Ingress (FastAPI: schema, routing, errors)
                                           --handle--> NOVAModel replicas (one NOVARunner each)

Each `NOVAModel` replica loads its engine folder once (`NOVARunner.from_engines`, which verifies every
artifact) and serves single-image requests in batches of up to the engines' built batch
(`@serve.batch`): requests with the same options (steps, guidance, negative prompt or not) share one
runner call, each row drawing from its own seed (`runtime.draws.PerRowDraws`), so every response equals
a call of its own with that seed. The ingress is a separate deployment so that a model replica that
dies mid-request turns into a 503 for its callers (the proxy would answer 500) while Ray restarts it.
"""

import asyncio
import base64
import functools
import io
import json
import re
import tempfile
import threading
from pathlib import Path
from typing import Any, AsyncIterator

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve import Application
from ray.serve.exceptions import DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from serve import jobs, openai_api
from serve.errors import Refused
from serve.progress import with_progress
from serve.schema import RUNNER_OPTIONS, ImageRequest, VideoRequest
from serve.uploads import decode_image

DEMO = Path(__file__).with_name("demo")  # the web page served at /


# -- the model deployment ------------------------------------------------------------------------------------


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _mp4(frames: np.ndarray, fps: int) -> bytes:
    from runtime.media import write_mp4

    with tempfile.TemporaryDirectory() as folder:
        return write_mp4(frames, Path(folder) / "video.mp4", fps=fps).read_bytes()


def _runner_kwargs(options: dict) -> dict:
    return {name: options[name] for name in RUNNER_OPTIONS if name in options}


@serve.deployment
class NOVAModel:
    """One `NOVARunner` over one engine folder. Single-image requests (one prompt, one image) are batched;
    other requests run as calls of their own. Every method answers a runner refusal with `Refused`."""

    def __init__(self, folder: str, backend: str = "auto", device: str | None = None, batch_wait_s: float = 0.02):
        from runtime import NOVARunner

        self.folder = Path(folder)
        self.runner = NOVARunner.from_engines(self.folder, backend=backend, device=device)
        self.counts = {"requests": 0, "runner_calls": 0}
        self._counting = threading.Lock()  # runner calls are counted in worker threads
        self._image_batch.set_max_batch_size(self.runner.geometry.batch)
        self._image_batch.set_batch_wait_timeout_s(batch_wait_s)

    def describe(self) -> dict[str, Any]:
        """What the engines were built for (GET /v1/models)."""
        g = self.runner.geometry
        height, width = g.image_size
        return {"id": model_id(self.folder), "kind": "video" if g.has_motion else "image", "size": f"{width}x{height}",
                "build": self.runner.describe_build(), "batch": g.batch, "cfg": g.cfg,
                "min_mask_steps": self.runner.build.min_mask_steps, "max_latent_length": g.max_latent_length}

    def stats(self) -> dict[str, int]:
        """This replica's counts since it started: requests served and runner calls made."""
        with self._counting:
            return dict(self.counts)

    def _count(self, name: str) -> None:
        with self._counting:
            self.counts[name] += 1

    def _call(self, prompt, draws=None, seed=None, **options):
        """One runner call (in a worker thread); a refusal becomes `Refused`."""
        self._count("runner_calls")
        try:
            return self.runner(prompt, draws=draws, seed=seed, **options)
        except ValueError as error:
            raise Refused(str(error)) from None

    async def images(self, options: dict) -> list[bytes]:
        """PNG bytes of each requested image."""
        self._count("requests")
        if isinstance(options["prompt"], str) and options["num_images_per_prompt"] == 1:
            result = await self._image_batch(options)
            if isinstance(result, Refused):
                raise result
            return [result]
        output = await asyncio.to_thread(self._call, seed=options["seed"], **_runner_kwargs(options))
        return [_png(image) for image in output.images]

    @serve.batch(max_batch_size=1)  # set to the engines' batch in __init__
    async def _image_batch(self, batch: list[dict]) -> list[bytes | Refused]:
        """Compatible requests (equal options but prompt and seed) share one call, row i drawing from seed i."""
        groups: dict[tuple, list[int]] = {}
        for i, options in enumerate(batch):
            key = sorted((k, v) for k, v in options.items() if k not in ("prompt", "negative_prompt", "seed"))
            groups.setdefault((*key, options["negative_prompt"] is None), []).append(i)
        results: list[bytes | Refused] = [b""] * len(batch)
        for rows in groups.values():
            for i, result in zip(rows, await asyncio.to_thread(self._rows, [batch[i] for i in rows])):
                results[i] = result
        return results

    def _rows(self, batch: list[dict]) -> list[bytes | Refused]:
        import torch

        from runtime.draws import PerRowDraws

        generators = [torch.Generator() for _ in batch]
        for generator, options in zip(generators, batch):
            if options["seed"] is None:
                generator.seed()
            else:
                generator.manual_seed(options["seed"])
        negatives = [o["negative_prompt"] for o in batch] if batch[0]["negative_prompt"] is not None else None
        options = {**_runner_kwargs(batch[0]), "prompt": [o["prompt"] for o in batch], "negative_prompt": negatives}
        try:
            output = self._call(draws=PerRowDraws(generators), **options)
        except Refused as refusal:
            return [refusal] * len(batch)  # the rows share every option the runner checks
        return [_png(image) for image in output.images]

    async def video(self, options: dict) -> list[bytes]:
        """MP4 bytes of each requested video."""
        self._count("requests")
        output = await asyncio.to_thread(self._call, seed=options["seed"], **_runner_kwargs(options))
        return [_mp4(video, options["fps"]) for video in output.frames]

    async def progress(self, kind: str, options: dict) -> AsyncIterator[dict]:
        """One runner call reporting {"progress": ...} after every mask step, then {"result": [PNG or MP4 bytes
        per image or video]}. Closing the stream stops the runner within one mask step (`serve.progress`)."""
        self._count("requests")
        encode = _png if kind == "image" else functools.partial(_mp4, fps=options["fps"])

        def call(stop, on_step) -> list[bytes]:
            output = self._call(seed=options["seed"], stop=stop, on_step=on_step, **_runner_kwargs(options))
            return [encode(result) for result in (output.images if kind == "image" else output.frames)]

        async for event in with_progress(call):
            yield event

    async def stream_video(self, options: dict) -> AsyncIterator[np.ndarray]:
        """Each decoded window of frames, uint8 [B, T_window, H, W, 3], as soon as it exists."""
        self._count("requests")
        self._count("runner_calls")
        try:  # the runner checks the request when the stream is made, before any window
            windows = self.runner.stream(seed=options["seed"], **_runner_kwargs(options))
        except ValueError as error:
            raise Refused(str(error)) from None
        while True:
            window = await asyncio.to_thread(next, windows, None)
            if window is None:
                return
            yield window


def model_id(folder: str | Path) -> str:
    """A model's id (and deployment name): its engine folder's name."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", Path(folder).resolve().name)


# -- the HTTP ingress ------------------------------------------------------------------------------------------

api = FastAPI(title="NOVA", description="NOVA text-to-image and text-to-video over NOVARunner engines")
UNAVAILABLE = "the replica serving this request stopped (Ray restarts it); retry the request"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
    problems = []
    for problem in error.errors():
        where = ".".join(str(part) for part in problem["loc"] if part != "body") or "body"
        problems.append(f"{where}: {problem['msg']}" + (" (unknown field)" if problem["type"] == "extra_forbidden" else ""))
    return _error(422, "; ".join(problems))


def _explain(error: BaseException) -> tuple[int, str]:
    """A replica's refusal -> 400/404 with its message; a dead or unreachable replica -> 503; else the
    error itself (re-raised by `_failure`, told as it is by a job)."""
    cause = error.cause if isinstance(error, RayTaskError) else error
    if isinstance(cause, Refused):
        return cause.status, str(cause)
    if isinstance(cause, (RayActorError, DeploymentUnavailableError)):
        return 503, UNAVAILABLE
    return 500, f"{type(cause).__name__}: {cause}"


def _failure(error: BaseException) -> JSONResponse:
    status, message = _explain(error)
    if status == 500:
        raise error
    return _error(status, message)


def _video_options(body: VideoRequest) -> dict:
    """A video request's options for the replica, its image decoded (a broken one refused here)."""
    options = body.model_dump()
    if options["image"] is not None:
        try:
            options["image"] = decode_image(options["image"])
        except ValueError as error:
            raise Refused(str(error)) from None
    return options


def _event(name: str, data: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


async def _events(first: np.ndarray, windows) -> AsyncIterator[bytes]:
    """SSE: `window` events {"index", "start", "shape": [B, T, H, W, 3], "frames": base64 raw uint8}, then
    `done` {"frames": total per video}; a replica lost mid-stream ends it with `error` {"status", "error"}."""
    index, start, window = 0, 0, first
    while window is not None:
        yield _event("window", {"index": index, "start": start, "shape": list(window.shape),
                                "frames": base64.b64encode(np.ascontiguousarray(window).tobytes()).decode()})
        index, start = index + 1, start + window.shape[1]
        try:
            window = await windows.__anext__()
        except StopAsyncIteration:
            window = None
        except Exception as error:  # noqa: BLE001
            response = _failure(error)
            yield _event("error", {"status": response.status_code, "error": response.body.decode()})
            return
    yield _event("done", {"frames": start})


async def _progress_events(stream) -> AsyncIterator[bytes]:
    """SSE of a replica's `progress` stream: a `progress` event after every mask step ({frames_done, frames,
    mask_steps_done, mask_steps}), then `done` {"images": [base64 PNG, ...]}, or `error` {"status", "error"}."""
    try:  # the stream is cancelled when the client goes away (the replica's runner stops) or it ends
        async for event in stream:
            if "progress" in event:
                yield _event("progress", event["progress"])
            else:
                yield _event("done", {"images": [base64.b64encode(png).decode() for png in event["result"]]})
    except Exception as error:  # noqa: BLE001
        status, message = _explain(error)
        yield _event("error", {"status": status, "error": message})
    finally:
        stream.cancel()


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress(api)
class Ingress:
    def __init__(self, models: dict[str, DeploymentHandle], job_settings: dict[str, float]):
        """job_settings: the video jobs' max_jobs, keep_s and slots (`serve.jobs.Jobs`)."""
        self.models = models
        self._described: dict[str, dict] = {}
        self.jobs = jobs.Jobs(_explain, **job_settings)

    async def _describe(self, name: str) -> dict:
        if name not in self._described:
            self._described[name] = await self.models[name].describe.remote()
        return self._described[name]

    async def _model_name(self, name: str | None, kind: str) -> str:
        """The id of the model a request names, or of the only one of its kind."""
        if name is not None:
            if name not in self.models:
                raise Refused(f"no model {name!r}; served: {', '.join(self.models)}", 404)
            if (await self._describe(name))["kind"] != kind:
                raise Refused(f"model {name!r} generates {(await self._describe(name))['kind']}s, not {kind}s", 404)
            return name
        names = [n for n in self.models if (await self._describe(n))["kind"] == kind]
        if len(names) != 1:
            raise Refused(f"no {kind} model is served" if not names else
                          f"several {kind} models are served ({', '.join(names)}): name one in 'model'", 404)
        return names[0]

    async def _model(self, name: str | None, kind: str) -> DeploymentHandle:
        return self.models[await self._model_name(name, kind)]

    @api.get("/", response_model=None)
    async def demo(self) -> Response:
        """The web demo: a page over this API (serve/demo/)."""
        return Response((DEMO / "index.html").read_bytes(), media_type="text/html")

    @api.get("/healthz", response_model=None)
    async def healthz(self) -> JSONResponse:
        """200 when every model answers within 5 s, else 503 naming those that do not."""
        async def answers(handle: DeploymentHandle) -> bool:
            try:
                await asyncio.wait_for(handle.stats.remote(), 5)
            except (asyncio.TimeoutError, RayActorError, DeploymentUnavailableError):
                return False
            return True

        down = [name for name, handle in self.models.items() if not await answers(handle)]
        return JSONResponse({"status": "unavailable" if down else "ok", "models": list(self.models), "down": down},
                            status_code=503 if down else 200)

    @api.get("/v1/models")
    async def list_models(self) -> dict:
        return {"models": [await self._describe(name) for name in self.models]}

    @api.post("/v1/images", response_model=None)
    async def images(self, body: ImageRequest, stream: bool = False) -> Response:
        """One image: image/png. Several: JSON {"images": [base64 PNG, ...]} (prompt-major). stream=true:
        server-sent events, `progress` after every mask step, then `done` with the images (or `error`)."""
        try:
            model = await self._model(body.model, "image")
            if stream:
                return StreamingResponse(_progress_events(model.options(stream=True).progress.remote(
                    "image", body.model_dump())), media_type="text/event-stream")
            images = await model.images.remote(body.model_dump())
        except Exception as error:  # noqa: BLE001 - sorted by _failure, which re-raises the unknown
            return _failure(error)
        if len(images) == 1:
            return Response(images[0], media_type="image/png")
        return JSONResponse({"images": [base64.b64encode(image).decode() for image in images]})

    @api.post("/v1/videos", response_model=None)
    async def videos(self, body: VideoRequest, stream: bool = False) -> Response:
        """One video: video/mp4; several: JSON {"videos": [base64 MP4, ...]}. stream=true: server-sent
        events, one `window` event per decoded window of frames, then `done` (or `error`)."""
        try:
            model, options = await self._model(body.model, "video"), _video_options(body)
            if not stream:
                videos = await model.video.remote(options)
                if len(videos) == 1:
                    return Response(videos[0], media_type="video/mp4")
                return JSONResponse({"videos": [base64.b64encode(video).decode() for video in videos]})
            windows = model.options(stream=True).stream_video.remote(options)
            first = await windows.__anext__()  # a refusal comes before any window: answer it with a status
        except Exception as error:  # noqa: BLE001
            return _failure(error)
        return StreamingResponse(_events(first, windows), media_type="text/event-stream")

    @api.post("/v1/images/generations", response_model=None)
    async def image_generations(self, body: openai_api.ImageGeneration) -> Response:
        """The OpenAI images API (serve/openai_api.py): {"created", "data": [{"b64_json"}, ...]}."""
        try:
            model = await self._describe(await self._model_name(body.model, "image"))
            images = await self.models[model["id"]].images.remote(openai_api.image_options(body, model))
        except Exception as error:  # noqa: BLE001
            return _failure(error)
        return JSONResponse(openai_api.images_response(images))

    @api.post("/v1/videos/jobs", response_model=None)
    async def create_video_job(self, body: VideoRequest) -> Response:
        """A video job (serve/jobs.py), answered at once with its status."""
        try:
            name, options = await self._model_name(body.model, "video"), _video_options(body)
            job = self.jobs.submit(name, self.models[name], options)
        except Refused as refusal:
            return _error(refusal.status, str(refusal))
        return JSONResponse(self.jobs.describe(job))

    @api.get("/v1/videos/jobs/{job_id}", response_model=None)
    async def video_job(self, job_id: str) -> Response:
        try:
            return JSONResponse(self.jobs.describe(self.jobs.get(job_id)))
        except Refused as refusal:
            return _error(refusal.status, str(refusal))

    @api.delete("/v1/videos/jobs/{job_id}", response_model=None)
    async def cancel_video_job(self, job_id: str) -> Response:
        """Cancel a queued or running job (its runner stops within one mask step); delete a finished one."""
        try:
            return JSONResponse(self.jobs.describe(await self.jobs.cancel(job_id)))
        except Refused as refusal:
            return _error(refusal.status, str(refusal))

    @api.get("/v1/videos/jobs/{job_id}/content", response_model=None)
    async def video_job_content(self, job_id: str, index: int = 0) -> Response:
        """The job's video `index` (of its num_images_per_prompt x prompts), video/mp4, once it is done."""
        try:
            job = self.jobs.get(job_id)
        except Refused as refusal:
            return _error(refusal.status, str(refusal))
        if job.status != "done":
            return _error(409, f"job {job_id!r} is {job.status}, not done: it has no video"
                          + (f" ({job.error})" if job.error else ""))
        if not 0 <= index < len(job.videos):
            return _error(404, f"job {job_id!r} made {len(job.videos)} videos; index must be in [0, {len(job.videos)})")
        return Response(job.videos[index], media_type="video/mp4")


# -- building the application ----------------------------------------------------------------------------------


def build_app(engines: list[str], *, backend: str = "auto", device: str | None = None, num_replicas: int = 1,
              num_cpus: float = 1, num_gpus: float = 0, max_ongoing_requests: int = 32, batch_wait_s: float = 0.02,
              env: dict[str, str] | None = None, max_jobs: int = jobs.MAX_JOBS,
              job_keep_s: float = jobs.KEEP_S) -> Application:
    """One NOVAModel deployment per engine folder (named by the folder) behind the ingress.

    num_cpus / num_gpus: each replica's Ray resources (num_gpus=1: one replica per GPU; Ray sets
    CUDA_VISIBLE_DEVICES, so the replica's "cuda" is its own GPU). max_ongoing_requests: requests a replica
    holds at once; at least twice the built batch lets the next batch fill while one runs. env: environment
    variables of the replicas (e.g. NOVA_ORT_THREADS). max_jobs: video jobs held at once (queued, running or
    finished); job_keep_s: how long a finished job's video is kept."""
    if not engines:
        raise ValueError("give at least one engine folder")
    ids = [model_id(folder) for folder in engines]
    if len(set(ids)) != len(ids):
        raise ValueError(f"engine folders need distinct names, got {', '.join(ids)}")
    actor = {"num_cpus": num_cpus, "num_gpus": num_gpus, **({"runtime_env": {"env_vars": env}} if env else {})}
    models = {name: NOVAModel.options(name=name, num_replicas=num_replicas, ray_actor_options=actor,
                                      max_ongoing_requests=max_ongoing_requests)
              .bind(str(Path(folder).resolve()), backend, device, batch_wait_s)
              for name, folder in zip(ids, engines)}
    return Ingress.bind(models, {"max_jobs": max_jobs, "keep_s": job_keep_s, "slots": num_replicas})


def app_builder(args: dict[str, Any]) -> Application:
    """For Serve config files (`import_path: serve.app:app_builder`, `args:` the keywords of build_app)."""
    return build_app(**args)


__all__ = ["ImageRequest", "VideoRequest", "NOVAModel", "Ingress", "build_app", "app_builder", "model_id"]
