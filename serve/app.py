"""The Ray Serve application: one `NOVAModel` deployment per engine folder behind an HTTP `Ingress`.

    client --HTTP--> Ray Serve proxy --> Ingress (FastAPI: schema, routing, deadlines, errors)
                                           --handle--> NOVAModel replicas (one NOVARunner each)

Each `NOVAModel` replica loads its engine folder once (`NOVARunner.from_engines`, which verifies every
artifact) and serves single-image requests in batches of up to the engines' built batch
(`@serve.batch`): requests with the same options (steps, guidance, negative prompt or not) share one
runner call, each row drawing from its own seed (`runtime.draws.PerRowDraws`), so every response equals
a call of its own with that seed. The ingress is a separate deployment so that a model replica that
dies mid-request turns into a 503 for its callers (the proxy would answer 500) while Ray restarts it.

No request holds a replica hostage: every runner call carries a `runtime.cancellation.StopSignal` whose
deadline is the request's (per kind, from its arrival at the ingress) and whose event is set when its
client goes away (Ray Serve cancels the request), so the runner stops within one mask step. A batched
call stops when every one of its clients has gone, at the latest one's deadline: one client leaving
does not cost the others their images.
"""

import asyncio
import base64
import contextlib
import io
import json
import math
import os
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve import Application, metrics
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile

from runtime.cancellation import Cancelled, DeadlineExceeded, StopSignal
from runtime.options import MAX_REQUEST_BYTES
from runtime.progress import Progress
from serve import defaults, jobs, openai_api
from serve.errors import Refused
from serve.progress import Emit, from_thread, progress_event
from serve.schema import RUNNER_OPTIONS, ImageRequest, VideoRequest
from serve.uploads import decode_image, read_image

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


def _batchable(options: dict) -> bool:
    """One prompt string, one image, and no negative prompt or one string: a row of a batched call (a
    negative prompt list, even of one entry, is the runner's to check against the prompts)."""
    return (isinstance(options["prompt"], str) and options["num_images_per_prompt"] == 1
            and not isinstance(options["negative_prompt"], list))


class _Caller:
    """One request in a replica: its options, its deadline (a `time.time()` instant: the ingress sets it in
    another process), the runner call it joined, and whether it still waits for the runner (queue depth)."""

    def __init__(self, options: dict, deadline: float):
        self.options, self.deadline = options, deadline
        self.call: _Call | None = None
        self.waiting = False

    def leave(self) -> None:
        """The client went away (Ray Serve cancelled the request)."""
        if self.call is not None:
            self.call.leave(self)


class _Call:
    """A runner call for one or more callers. Its stop signal is set once every caller has left, and its
    deadline is the latest caller's."""

    def __init__(self, callers: list[_Caller]):
        self.callers, self.present = callers, set(callers)
        self.cancel = threading.Event()
        latest = max(caller.deadline for caller in callers)
        self.stop = StopSignal(self.cancel, time.monotonic() + latest - time.time())
        for caller in callers:
            caller.call = self

    def leave(self, caller: _Caller) -> None:
        self.present.discard(caller)
        if not self.present:
            self.cancel.set()


@serve.deployment(health_check_period_s=1, health_check_timeout_s=10)  # a dead replica is replaced at once
class NOVAModel:
    """One `NOVARunner` over one engine folder. Single-image requests (one prompt, one image) are batched;
    other requests run as calls of their own. Every method answers a runner refusal with `Refused`; every
    request takes `deadline`, a `time.time()` instant after which its runner call stops."""

    def __init__(self, folder: str, backend: str = "auto", device: str | None = None,
                 batch_wait_s: float = defaults.BATCH_WAIT_S):
        from runtime import NOVARunner

        self.folder = Path(folder)
        self.runner = NOVARunner.from_engines(self.folder, backend=backend, device=device)
        self.counts = {"requests": 0, "runner_calls": 0, "stopped": 0, "waiting": 0}
        self._counting = threading.Lock()  # counted in the event loop and in worker threads
        self._turn = threading.Lock()  # one runner call at a time: the others wait here, counted as waiting
        self._queue_depth = metrics.Gauge("nova_queue_depth", "requests a replica holds that wait for the runner",
                                          tag_keys=("model",))
        self._queue_depth.set_default_tags({"model": model_id(self.folder)})
        self._queue_depth.set(0)
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
        """This replica's counts since it started (requests served, runner calls made, runner calls stopped before
        their end: their clients gone or their deadline passed), the requests waiting for the runner now, and its
        process id (benchmarks/serve.py follows its memory)."""
        with self._counting:
            return {**self.counts, "pid": os.getpid()}

    def _count(self, name: str) -> None:
        with self._counting:
            self.counts[name] += 1

    def _wait(self, callers: list[_Caller], waiting: bool) -> None:
        """Callers start or stop waiting for the runner: on arrival; when their call starts or they leave, whichever
        comes first."""
        with self._counting:
            for caller in callers:
                if caller.waiting != waiting:
                    caller.waiting = waiting
                    self.counts["waiting"] += 1 if waiting else -1
            self._queue_depth.set(self.counts["waiting"])

    @contextlib.contextmanager
    def _held(self, caller: _Caller):
        """A request from arrival to answer; it waits until its runner call starts (or it leaves)."""
        self._count("requests")
        self._wait([caller], True)
        try:
            yield
        except asyncio.CancelledError:
            caller.leave()
            raise
        finally:
            self._wait([caller], False)

    @contextlib.contextmanager
    def _running(self, call: _Call):
        """The runner's turn for `call` (in a worker thread); a refusal becomes `Refused`, a stop is counted."""
        with self._turn:
            self._wait(call.callers, False)
            call.stop.check()  # its clients left, or its deadline passed, while it waited: no work at all
            self._count("runner_calls")
            try:
                yield
            except ValueError as error:
                raise Refused(str(error)) from None
            except Cancelled:
                self._count("stopped")
                raise

    def _call(self, call: _Call, **options):
        with self._running(call):
            return self.runner(stop=call.stop, **options)

    async def images(self, options: dict, deadline: float) -> list[bytes]:
        """PNG bytes of each requested image."""
        caller = _Caller(options, deadline)
        with self._held(caller):
            if _batchable(options):
                result = await self._image_batch(caller)
                if isinstance(result, Exception):
                    raise result
                return [result]
            output = await asyncio.to_thread(self._call, _Call([caller]), seed=options["seed"],
                                             **_runner_kwargs(options))
        return [_png(image) for image in output.images]

    @serve.batch(max_batch_size=1)  # set to the engines' batch in __init__
    async def _image_batch(self, callers: list[_Caller]) -> list[bytes | Exception]:
        """Compatible requests (equal options but prompt and seed) share one call, row i drawing from seed i."""
        groups: dict[tuple, list[_Caller]] = {}
        for caller in callers:
            options = caller.options
            key = sorted((k, v) for k, v in options.items() if k not in ("prompt", "negative_prompt", "seed"))
            groups.setdefault((*key, options["negative_prompt"] is None), []).append(caller)
        results: dict[_Caller, bytes | Exception] = {}
        for group in groups.values():
            results.update(zip(group, await asyncio.to_thread(self._rows, _Call(group))))
        return [results[caller] for caller in callers]

    def _rows(self, call: _Call) -> list[bytes | Exception]:
        from runtime.draws import PerRowDraws

        batch = [caller.options for caller in call.callers]
        negatives = [o["negative_prompt"] for o in batch] if batch[0]["negative_prompt"] is not None else None
        options = {**_runner_kwargs(batch[0]), "prompt": [o["prompt"] for o in batch], "negative_prompt": negatives}
        try:
            output = self._call(call, draws=PerRowDraws.from_seeds([o["seed"] for o in batch]), **options)
        except Exception as error:  # noqa: BLE001 - the rows share every option the runner checks, and the stop
            return [error] * len(batch)
        return [_png(image) for image in output.images]

    async def video(self, options: dict, deadline: float) -> list[bytes]:
        """MP4 bytes of each requested video."""
        caller = _Caller(options, deadline)
        with self._held(caller):
            output = await asyncio.to_thread(self._call, _Call([caller]), seed=options["seed"],
                                             **_runner_kwargs(options))
        return [_mp4(video, options["fps"]) for video in output.frames]

    async def events(self, options: dict, deadline: float, answer: str) -> AsyncIterator[dict]:
        """One runner call's events as they happen: {"progress": {frames_done, frames, mask_steps_done,
        mask_steps}} after every mask step, and by `answer`: "png" or "mp4", then {"result": [PNG or MP4 bytes
        per image or video]} at the end; "windows", {"window": uint8 [B, T_window, H, W, 3]} as soon as each
        window of frames is decoded (the progress of its frames comes before it). Closing the stream stops the
        runner within one mask step (`serve.progress`)."""
        caller = _Caller(options, deadline)
        call, kwargs = _Call([caller]), {"seed": options["seed"], **_runner_kwargs(options)}

        def run(emit: Emit) -> None:
            def on_step(progress: Progress) -> None:
                emit(progress_event(progress))

            with self._running(call):
                if answer == "windows":
                    for window in self.runner.stream(stop=call.stop, on_step=on_step, **kwargs):
                        emit({"window": window})
                    return
                output = self.runner(stop=call.stop, on_step=on_step, **kwargs)
            emit({"result": [_png(image) for image in output.images] if answer == "png"
                  else [_mp4(video, options["fps"]) for video in output.frames]})

        with self._held(caller):
            async for event in from_thread(run, caller.leave):
                yield event


def model_id(folder: str | Path) -> str:
    """A model's id (and deployment name): its engine folder's name."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", Path(folder).resolve().name)


# -- the HTTP ingress ------------------------------------------------------------------------------------------

api = FastAPI(title="NOVA", description="NOVA text-to-image and text-to-video over NOVARunner engines")
UNAVAILABLE = "the replica serving this request stopped (Ray restarts it); retry the request"


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


@api.middleware("http")
async def _bounded_body(request: Request, call_next):
    """413 before the body is read when its declared length exceeds what a valid request can need."""
    length = request.headers.get("content-length", "0")
    if length.isdigit() and int(length) > MAX_REQUEST_BYTES:
        return _error(413, f"the request body has {int(length)} bytes; a request needs at most {MAX_REQUEST_BYTES}")
    return await call_next(request)


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
    problems = []
    for problem in error.errors():
        where = ".".join(str(part) for part in problem["loc"] if part != "body") or "body"
        problems.append(f"{where}: {problem['msg']}" + (" (unknown field)" if problem["type"] == "extra_forbidden" else ""))
    return _error(422, "; ".join(problems))


def _failure(error: BaseException) -> JSONResponse:
    """A replica's refusal -> 400/404/504 with its message; a passed deadline -> 504; a full queue -> 503 with
    Retry-After; a dead or unreachable replica -> 503."""
    cause = error.cause if isinstance(error, RayTaskError) else error
    if isinstance(cause, Refused):
        return _error(cause.status, str(cause))
    if isinstance(cause, DeadlineExceeded):
        return _error(504, str(cause))
    if isinstance(cause, BackPressureError):
        return _error(cause.status_code, "every replica of this model is busy and its queue is full; retry later",
                      {"Retry-After": str(math.ceil(cause.retry_after_s))})
    if isinstance(cause, (RayActorError, DeploymentUnavailableError)):
        return _error(503, UNAVAILABLE)
    raise error


def _sentence(error: BaseException) -> str:
    """Why a replica call failed, in one sentence (a job's error)."""
    try:
        return json.loads(_failure(error).body)["error"]
    except Exception:  # noqa: BLE001 - an error the service does not sort: told as it is
        return f"{type(error).__name__}: {error}"


def _options(body: ImageRequest | VideoRequest, upload: bytes | None = None) -> dict:
    """A request's options for the replica, a video's image decoded, from its base64 field or from the bytes of an
    uploaded file (a broken one refused here; the replica's runner fits either to the model's resolution)."""
    options = body.model_dump()
    try:
        if upload is not None:
            options["image"] = read_image(upload)
        elif options.get("image") is not None:
            options["image"] = decode_image(options["image"])
    except ValueError as error:
        raise Refused(str(error)) from None
    return options


# The body of POST /v1/videos and /v1/videos/jobs, for the OpenAPI page (`_video_request` reads it).
VIDEO_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": VideoRequest.model_json_schema()},
    "multipart/form-data": {"schema": {"type": "object", "required": ["request"], "properties": {
        "request": {"type": "string", "description": "the video request's JSON, without its image field"},
        "image": {"type": "string", "format": "binary", "description": "the image prompt: a PNG or JPEG file"}}}}}}}
PARTS = ("request", "image")


async def _video_request(request: Request) -> tuple[VideoRequest, dict]:
    """A video request and its options for the replica. Its body is the request's JSON, or multipart/form-data
    with a `request` part (the same JSON, as a field or a file) and an optional `image` file part, a PNG or
    JPEG given as the `image` field would be. A body that is no valid request: `RequestValidationError` (422)."""
    upload = None
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        limits = {"max_files": len(PARTS), "max_fields": len(PARTS), "max_part_size": MAX_REQUEST_BYTES}
        async with request.form(**limits) as form:
            unknown = sorted(set(form) - set(PARTS))
            if unknown or "request" not in form:
                raise Refused(f"a multipart video request has a 'request' part (its JSON) and an optional 'image' "
                              f"part (a PNG or JPEG file), got {', '.join(map(repr, form)) or 'no parts'}", 422)
            text, image = form["request"], form.get("image")
            text = await text.read() if isinstance(text, UploadFile) else text
            if image is not None and not isinstance(image, UploadFile):
                raise Refused("the 'image' part must be a file (a PNG or JPEG), not a text field", 422)
            upload = None if image is None else await image.read()
    else:
        text = await request.body()
    try:
        body = VideoRequest.model_validate_json(text)
    except ValidationError as error:
        raise RequestValidationError(error.errors()) from None
    if upload is not None and body.image is not None:
        raise Refused("give the image prompt once: as the 'image' part or as the request's image field", 422)
    return body, _options(body, upload)


def _event(name: str, data: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


async def _awaited(response):
    return await response


async def _answers(handle: DeploymentHandle) -> bool:
    """Whether the model answers a probe within defaults.HEALTH_PROBE_S. A full queue counts as answering:
    its replicas are up, only busy."""
    response = handle.stats.remote()
    try:
        await asyncio.wait_for(_awaited(response), defaults.HEALTH_PROBE_S)
    except BackPressureError:
        return True
    except (asyncio.TimeoutError, RayActorError, DeploymentUnavailableError):
        response.cancel()
        return False
    return True


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress(api)
class Ingress:
    def __init__(self, models: dict[str, DeploymentHandle], deadlines_s: dict[str, float] = defaults.DEADLINE_S,
                 job_settings: dict[str, float] | None = None):
        """job_settings: the video jobs' max_jobs, keep_s and slots (`serve.jobs.Jobs`)."""
        self.models, self.deadlines_s = models, deadlines_s
        self._described: dict[str, dict] = {}
        self.jobs = jobs.Jobs(_sentence, deadline_s=deadlines_s["video"], **(job_settings or {}))
        self._cancelled = metrics.Counter("nova_cancelled_requests", "requests stopped before their end: their "
                                          "client went away, or their deadline passed", tag_keys=("model", "reason"))

    async def _describe(self, name: str) -> dict:
        if name not in self._described:
            self._described[name] = await self.models[name].describe.remote()
        return self._described[name]

    async def _model(self, name: str | None, kind: str) -> str:
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

    @contextlib.asynccontextmanager
    async def _watched(self, model: str, kind: str, cancel: Callable[[], None]):
        """Count a request that stops early, and cancel its replica call when its client goes away (Ray Serve
        cancels this handler, or closes the stream) or when the ingress gives up waiting (its deadline)."""
        try:
            yield
        except (asyncio.CancelledError, GeneratorExit):
            cancel()
            self._cancelled.inc(tags={"model": model, "reason": "client"})
            raise
        except asyncio.TimeoutError as error:
            cancel()
            self._cancelled.inc(tags={"model": model, "reason": "deadline"})
            raise Refused(f"the request ran past its {self.deadlines_s[kind]:g} s deadline", 504) from error
        except RayTaskError as error:
            if isinstance(error.cause, DeadlineExceeded):
                self._cancelled.inc(tags={"model": model, "reason": "deadline"})
            raise

    async def _answer(self, model: str, options: dict, kind: str, method: str) -> list[bytes]:
        """The replica's answer to a request, within the kind's deadline (the replica stops there too; the
        ingress's own wait is one second longer, for a request that never reached a replica)."""
        response = getattr(self.models[model], method).remote(options, time.time() + self.deadlines_s[kind])
        async with self._watched(model, kind, response.cancel):
            return await asyncio.wait_for(_awaited(response), self.deadlines_s[kind] + 1)

    @api.get("/", response_model=None)
    async def demo(self) -> Response:
        """The web demo: a page over this API (serve/demo/)."""
        return Response((DEMO / "index.html").read_bytes(), media_type="text/html")

    @api.get("/healthz", response_model=None)
    async def healthz(self, model: str | None = None) -> JSONResponse:
        """Which models answer within defaults.HEALTH_PROBE_S: 200 while any does (the others named in
        "down"), 503 when none does. model=<id>: that model only (404 if it is not served)."""
        if model is not None and model not in self.models:
            return _error(404, f"no model {model!r}; served: {', '.join(self.models)}")
        names = [model] if model is not None else list(self.models)
        answered = await asyncio.gather(*(_answers(self.models[name]) for name in names))
        up = [name for name, ok in zip(names, answered) if ok]
        down = [name for name, ok in zip(names, answered) if not ok]
        status = "ok" if not down else "degraded" if up else "unavailable"
        return JSONResponse({"status": status, "up": up, "down": down}, status_code=200 if up else 503)

    @api.get("/v1/models")
    async def list_models(self) -> dict:
        return {"models": [await self._describe(name) for name in self.models]}

    @api.post("/v1/images", response_model=None)
    async def images(self, body: ImageRequest, stream: bool = False) -> Response:
        """One image: image/png. Several: JSON {"images": [base64 PNG, ...]} (prompt-major). stream=true:
        server-sent events, `progress` after every mask step, then `done` with the images (or `error`)."""
        try:
            model, options = await self._model(body.model, "image"), _options(body)
            if stream:
                return await self._streamed(model, "image", options, "png")
            images = await self._answer(model, options, "image", "images")
        except Exception as error:  # noqa: BLE001 - sorted by _failure, which re-raises the unknown
            return _failure(error)
        if len(images) == 1:
            return Response(images[0], media_type="image/png")
        return JSONResponse({"images": [base64.b64encode(image).decode() for image in images]})

    @api.post("/v1/videos", response_model=None, openapi_extra=VIDEO_BODY)
    async def videos(self, request: Request, stream: bool = False) -> Response:
        """One video: video/mp4; several: JSON {"videos": [base64 MP4, ...]}. stream=true: server-sent
        events, `progress` after every mask step and one `window` per decoded window of frames, then `done`
        (or `error`). The body is JSON, or multipart with the image prompt as a file (`_video_request`)."""
        try:
            body, options = await _video_request(request)
            model = await self._model(body.model, "video")
            if stream:
                return await self._streamed(model, "video", options, "windows")
            videos = await self._answer(model, options, "video", "video")
        except Exception as error:  # noqa: BLE001
            return _failure(error)
        if len(videos) == 1:
            return Response(videos[0], media_type="video/mp4")
        return JSONResponse({"videos": [base64.b64encode(video).decode() for video in videos]})

    async def _streamed(self, model: str, kind: str, options: dict, answer: str) -> StreamingResponse:
        """The replica's `events` stream as server-sent events (`_sse`); a refusal comes before any event, so
        it is answered with its status instead."""
        deadline = time.time() + self.deadlines_s[kind]
        events = self.models[model].options(stream=True).events.remote(options, deadline, answer)
        async with self._watched(model, kind, events.cancel):
            first = await asyncio.wait_for(events.__anext__(), deadline + 1 - time.time())
        return StreamingResponse(self._sse(model, kind, first, events, deadline), media_type="text/event-stream")

    async def _sse(self, model: str, kind: str, first: dict, events, deadline: float) -> AsyncIterator[bytes]:
        """SSE of a replica's events, in their order: `progress` {frames_done, frames, mask_steps_done,
        mask_steps} after every mask step; a video's `window` {"index", "start", "shape": [B, T, H, W, 3],
        "frames": base64 raw uint8} per decoded window, then `done` {"frames": total per video}; images' `done`
        {"images": [base64 PNG, ...]}. A deadline passed or a replica lost mid-stream ends it with `error`
        {"status", "error"}. A client that closes the stream cancels the replica's generation."""
        event, index, start = first, 0, 0
        async with self._watched(model, kind, events.cancel):
            while event is not None:
                if "progress" in event:
                    yield _event("progress", event["progress"])
                elif "window" in event:
                    window = np.ascontiguousarray(event["window"])
                    yield _event("window", {"index": index, "start": start, "shape": list(window.shape),
                                            "frames": base64.b64encode(window.tobytes()).decode()})
                    index, start = index + 1, start + window.shape[1]
                else:
                    yield _event("done", {"images": [base64.b64encode(png).decode() for png in event["result"]]})
                try:
                    event = await asyncio.wait_for(events.__anext__(), deadline + 1 - time.time())
                except StopAsyncIteration:
                    event = None
                except Exception as error:  # noqa: BLE001
                    yield _event("error", {"status": _failure(error).status_code, "error": _sentence(error)})
                    return
        if kind == "video":
            yield _event("done", {"frames": start})

    @api.post("/v1/images/generations", response_model=None)
    async def image_generations(self, body: openai_api.ImageGeneration) -> Response:
        """The OpenAI images API (serve/openai_api.py): {"created", "data": [{"b64_json"}, ...]}."""
        try:
            model = await self._describe(await self._model(body.model, "image"))
            images = await self._answer(model["id"], openai_api.image_options(body, model), "image", "images")
        except Exception as error:  # noqa: BLE001
            return _failure(error)
        return JSONResponse(openai_api.images_response(images))

    @api.post("/v1/videos/jobs", response_model=None, openapi_extra=VIDEO_BODY)
    async def create_video_job(self, request: Request) -> Response:
        """A video job (serve/jobs.py), answered at once with its status. The body is that of POST /v1/videos."""
        try:
            body, options = await _video_request(request)
            model = await self._model(body.model, "video")
            job = self.jobs.submit(model, self.models[model], options)
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
              num_cpus: float = defaults.NUM_CPUS, num_gpus: float = 0,
              max_ongoing_requests: int = defaults.MAX_ONGOING_REQUESTS,
              max_queued_requests: int = defaults.MAX_QUEUED_REQUESTS, batch_wait_s: float = defaults.BATCH_WAIT_S,
              deadlines_s: dict[str, float] = defaults.DEADLINE_S, env: dict[str, str] | None = None,
              max_jobs: int = defaults.MAX_JOBS, job_keep_s: float = defaults.JOB_KEEP_S) -> Application:
    """One NOVAModel deployment per engine folder (named by the folder) behind the ingress.

    num_cpus / num_gpus: each replica's Ray resources (num_gpus=1: one replica per GPU; Ray sets
    CUDA_VISIBLE_DEVICES, so the replica's "cuda" is its own GPU). max_ongoing_requests: requests a replica
    holds at once; at least twice the built batch lets the next batch fill while one runs. max_queued_requests:
    requests a deployment queues for its replicas; beyond it the ingress answers 503 with Retry-After.
    deadlines_s: seconds per request kind ("image", "video") from its arrival. env: environment variables of
    the replicas (e.g. NOVA_ORT_THREADS). max_jobs: video jobs held at once (queued, running or finished);
    job_keep_s: how long a finished job's video is kept."""
    if not engines:
        raise ValueError("give at least one engine folder")
    ids = [model_id(folder) for folder in engines]
    if len(set(ids)) != len(ids):
        raise ValueError(f"engine folders need distinct names, got {', '.join(ids)}")
    if sorted(deadlines_s) != sorted(defaults.DEADLINE_S) or not all(s > 0 for s in deadlines_s.values()):
        raise ValueError(f"deadlines_s needs a positive number of seconds for each of {', '.join(defaults.DEADLINE_S)}, "
                         f"got {deadlines_s!r}")
    actor = {"num_cpus": num_cpus, "num_gpus": num_gpus, **({"runtime_env": {"env_vars": env}} if env else {})}
    models = {name: NOVAModel.options(name=name, num_replicas=num_replicas, ray_actor_options=actor,
                                      max_ongoing_requests=max_ongoing_requests, max_queued_requests=max_queued_requests,
                                      backpressure_config={"retry_after_s": defaults.RETRY_AFTER_S})
              .bind(str(Path(folder).resolve()), backend, device, batch_wait_s)
              for name, folder in zip(ids, engines)}
    return Ingress.bind(models, dict(deadlines_s), {"max_jobs": max_jobs, "keep_s": job_keep_s, "slots": num_replicas})


def app_builder(args: dict[str, Any]) -> Application:
    """For Serve config files (`import_path: serve.app:app_builder`, `args:` the keywords of build_app)."""
    return build_app(**args)


def unschedulable(resources: dict[str, float], engines: int, num_replicas: int, num_cpus: float,
                  num_gpus: float) -> str | None:
    """Why a plan of `engines` deployments x `num_replicas` replicas x (num_cpus, num_gpus) each cannot be
    placed on a cluster with `resources` (`ray.cluster_resources()`), or None if it fits in total."""
    for name, flag, each in (("CPU", "--num-cpus", num_cpus), ("GPU", "--num-gpus", num_gpus)):
        need, have = engines * num_replicas * each, resources.get(name, 0)
        if need > have:
            return (f"{engines} engine folder(s) x --replicas {num_replicas} x {flag} {each:g} need {need:g} {name}s "
                    f"but the cluster has {have:g}: lower {flag} or --replicas, or serve fewer --engines")
    return None


__all__ = ["ImageRequest", "VideoRequest", "NOVAModel", "Ingress", "build_app", "app_builder", "model_id",
           "unschedulable"]
