"""What a generation reports while it runs: its progress after each mask step and its seconds per stage."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import defaultdict
from typing import Callable, Iterator

from runtime.backends.base import Backend


@dataclasses.dataclass(frozen=True)
class Progress:
    """Where a generation stands after a mask step (`on_step`): the latent frames it generates (a prefilled
    image-to-video frame is not one) and their mask steps, done and in all."""

    frames_done: int
    frames: int
    mask_steps_done: int
    mask_steps: int


class StepCounter:
    """Counts mask steps for a tqdm bar and the caller's `on_step`."""

    def __init__(self, bar, on_step: Callable[[Progress], None] | None, frames: int, steps_per_frame: int):
        self.bar, self.on_step, self.frames, self.per_frame, self.done = bar, on_step, frames, steps_per_frame, 0

    def step(self) -> None:
        self.done += 1
        self.bar.update(1)
        if self.on_step is not None:
            self.on_step(Progress(self.done // self.per_frame, self.frames, self.done, self.frames * self.per_frame))


class StageTimer:
    """Seconds per stage (`runtime.runner.STAGES`), the backend synchronized at each stage's end; free when off."""

    def __init__(self, backend: Backend, enabled: bool):
        self.backend, self.enabled, self.seconds = backend, enabled, defaultdict(float)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        start = time.perf_counter()
        yield
        self.backend.synchronize()
        self.seconds[name] += time.perf_counter() - start
