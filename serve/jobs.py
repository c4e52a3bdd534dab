"""Video jobs, in the shape of OpenAI's videos API: a request answered at once with an id, polled for its
status and progress, cancelled, and its mp4 fetched when done.

The ingress holds the jobs in its memory: `max_jobs` at most (queued, running or finished), each finished
one kept `keep_s` seconds after it ended (or until deleted). Jobs of one model run `slots` at a time (its
replica count) in the order they came; the others wait, with their queue position. A cancelled job's
replica stream is closed, which stops its runner within one mask step (`serve.progress`). Jobs are not
persisted: when the ingress restarts, every job is gone (their ids answer 404) and running ones are
cancelled with their stream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable

from serve import defaults
from serve.errors import Refused

if TYPE_CHECKING:  # python -m serve --help imports this module without Ray
    from ray.serve.handle import DeploymentHandle

FINISHED = ("done", "failed", "cancelled")


@dataclasses.dataclass
class Job:
    id: str
    model: str
    options: dict
    created_at: float
    status: str = "queued"
    started_at: float | None = None
    finished_at: float | None = None
    progress: dict | None = None  # the runner's last `Progress` (frames and mask steps, done and in all)
    error: str | None = None  # why it failed: the runner's refusal or the service's sentence
    videos: list[bytes] | None = None  # MP4 bytes per video, when done
    task: asyncio.Task | None = None


class Jobs:
    """The ingress's video jobs. `explain(error)` says in one sentence why a replica call failed; a job's runner
    call stops `deadline_s` after it started running."""

    def __init__(self, explain: Callable[[BaseException], str], deadline_s: float,
                 max_jobs: int = defaults.MAX_JOBS, keep_s: float = defaults.JOB_KEEP_S, slots: int = 1):
        self.explain, self.deadline_s = explain, deadline_s
        self.max_jobs, self.keep_s, self.slots = max_jobs, keep_s, slots
        self._jobs: dict[str, Job] = {}
        self._running: dict[str, asyncio.Semaphore] = {}

    def submit(self, model: str, handle: DeploymentHandle, options: dict) -> Job:
        """Queue a video request for `model`; -> its job, at once."""
        self._expire()
        if len(self._jobs) >= self.max_jobs:
            raise Refused(f"the service holds its {self.max_jobs} jobs already (finished ones are kept "
                             f"{self.keep_s:g} s, or until deleted); retry later", 429)
        job = Job(f"video_{uuid.uuid4().hex}", model, options, time.time())
        self._jobs[job.id] = job
        job.task = asyncio.create_task(self._run(job, handle))
        return job

    def get(self, job_id: str) -> Job:
        self._expire()
        if job_id not in self._jobs:
            raise Refused(f"no job {job_id!r} (finished jobs are kept {self.keep_s:g} s; jobs do not outlive "
                             f"a restart of the service)", 404)
        return self._jobs[job_id]

    async def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job (its runner stops within one mask step); forget a finished one."""
        job = self.get(job_id)
        if job.status in FINISHED:
            del self._jobs[job_id]
            return job
        job.task.cancel()
        await asyncio.gather(job.task, return_exceptions=True)
        return job

    def describe(self, job: Job) -> dict[str, Any]:
        """A job's JSON: id, status, model, progress, queue position (while queued), timings, error."""
        queued = [other for other in self._jobs.values() if other.model == job.model and other.status == "queued"]
        ended = job.finished_at or time.time()
        return {"id": job.id, "object": "video.job", "status": job.status, "model": job.model,
                "progress": job.progress,
                "queue_position": queued.index(job) if job.status == "queued" else None,
                "created_at": job.created_at, "started_at": job.started_at, "finished_at": job.finished_at,
                "queued_s": (job.started_at or ended) - job.created_at,
                "running_s": None if job.started_at is None else ended - job.started_at,
                "error": job.error, "videos": None if job.videos is None else len(job.videos)}

    async def _run(self, job: Job, handle: DeploymentHandle) -> None:
        running = self._running.setdefault(job.model, asyncio.Semaphore(self.slots))
        try:
            async with running:
                job.status, job.started_at = "running", time.time()
                deadline = time.time() + self.deadline_s
                stream = handle.options(stream=True).events.remote(job.options, deadline, "mp4")
                try:
                    async for event in stream:
                        if "progress" in event:
                            job.progress = event["progress"]
                        else:
                            job.videos = event["result"]
                finally:
                    stream.cancel()  # a no-op once the stream has ended; else the replica's runner stops
            job.status = "done"
        except asyncio.CancelledError:
            job.status = "cancelled"
        except Exception as error:  # noqa: BLE001 - every failure is the job's, told by explain
            job.status, job.error = "failed", self.explain(error)
        finally:
            job.finished_at = time.time()

    def _expire(self) -> None:
        now = time.time()
        for job in [job for job in self._jobs.values() if job.finished_at and now - job.finished_at > self.keep_s]:
            del self._jobs[job.id]
