"""A runner call whose events reach the event loop as they happen: the call runs in a worker thread and hands
each event (a mask step's `runtime.progress.Progress`, a decoded video window, the result) to the loop in the
order it made them. Closing the stream before the call ends (a cancelled video job, a client gone from a
stream: Ray Serve closes the replica's generator) calls `leave`, which sets the call's stop signal, so the
runner stops within one mask step and is free for the next request."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, AsyncIterator, Callable

from runtime.progress import Progress

Emit = Callable[[dict], None]
_END = object()


def progress_event(progress: Progress) -> dict:
    """A mask step's report as an event: {"progress": {frames_done, frames, mask_steps_done, mask_steps}}."""
    return {"progress": dataclasses.asdict(progress)}


async def from_thread(work: Callable[[Emit], Any], leave: Callable[[], None]) -> AsyncIterator[dict]:
    """`work(emit)` in a worker thread; yields every event it emits, in order, as soon as it is emitted, and
    re-raises what work raised once the events before it are yielded."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue()

    def emit(event: dict) -> None:
        loop.call_soon_threadsafe(events.put_nowait, event)

    def run() -> None:
        try:
            work(emit)
        finally:
            loop.call_soon_threadsafe(events.put_nowait, _END)

    running = asyncio.ensure_future(asyncio.to_thread(run))
    running.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved, also if abandoned
    try:
        while (event := await events.get()) is not _END:
            yield event
        await running  # raises what stopped the call
    finally:
        leave()  # a no-op once the call has returned; else the stream was closed early: stop the runner
