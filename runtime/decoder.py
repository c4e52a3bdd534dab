"""Decoding latent frames to pixels as soon as they are generated, and the video VAE's temporal windows.

An image VAE decodes each latent frame. The Open-Sora video VAE decodes windows of up to
`VIDEO_VAE_WINDOW` latents with a stride of one less (the official tiling: [0:5], [4:9], [8:13], ...; a
video of at most 5 latents is one window); every window after the first drops its first output frame,
and latents that fill no window are not decoded. `video_windows` is the one statement of this tiling:
the decoder, the VAE graph's declaration and the benchmarks' call counts use it.
"""

from __future__ import annotations

from typing import Callable, ContextManager, Iterator

import numpy as np

from runtime.backends.base import Backend
from runtime.cancellation import NEVER, StopSignal
from runtime.graphs.profile import VIDEO_VAE_WINDOW


def window_length(latent_count: int) -> int:
    """Latents per window of a `latent_count`-latent video."""
    return min(VIDEO_VAE_WINDOW, latent_count)


def video_windows(latent_count: int) -> list[range]:
    """The latent indices each video VAE window decodes, in order."""
    length = window_length(latent_count)
    return [range(start, start + length) for start in range(0, latent_count - length + 1, max(1, length - 1))]


class Decoder:
    """Decodes one request's latent frames as they arrive (`ready`), window by window for the video VAE."""

    def __init__(self, backend: Backend, video_vae: bool, latent_count: int, batch: int,
                 stage: Callable[[str], ContextManager], stop: StopSignal = NEVER):
        """latent_count: the video's latents (prefilled ones included); batch: the request's samples (padded
        rows are not decoded); stage: the timer's context per stage; stop: checked before each decode."""
        self.backend, self.batch, self.stop, self.stage = backend, batch, stop, stage
        self.windows = video_windows(latent_count) if video_vae else None
        self.graph = "vae_decoder_single" if video_vae and window_length(latent_count) == 1 else "vae_decoder"
        self.decoded = 0  # image VAE: latent frames decoded; video VAE: windows decoded

    def ready(self, latents: list[np.ndarray]) -> Iterator[np.ndarray]:
        """Decode what became decodable with the latest of `latents` (each [B_built, C, h, w]): an image
        [B, H, W, 3], or the new windows' frames [B, T_window, H, W, 3]."""
        if self.windows is None:
            for frame in latents[self.decoded:]:
                self.stop.check()
                yield self._decode(frame)
            self.decoded = len(latents)
            return
        while self.decoded < len(self.windows) and self.windows[self.decoded].stop <= len(latents):
            self.stop.check()
            window = self.windows[self.decoded]
            pixels = self._decode(np.stack(latents[window.start:window.stop], axis=2))
            yield pixels if self.decoded == 0 else pixels[:, 1:]
            self.decoded += 1

    def _decode(self, latents: np.ndarray) -> np.ndarray:
        """Per sample (the VAE graphs are built for one sample at their optimum)."""
        backend = self.backend
        with self.stage("vae"):
            return np.concatenate([backend.download(backend.run(self.graph, {
                "latents": backend.upload(np.ascontiguousarray(latents[i:i + 1]))})["pixels"])
                for i in range(self.batch)])
