"""Writing generated frames: PNG images, PNG strips of video frames, and H.264 mp4 (PyAV)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import av
import numpy as np
from PIL import Image


def _check_frames(frames: np.ndarray, ndim: int, what: str) -> None:
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != ndim or frames.shape[-1] != 3:
        raise ValueError(f"{what} must be a uint8 array of shape {'[T, H, W, 3]' if ndim == 4 else '[H, W, 3]'}")


def _atomic(path: str | os.PathLike, write) -> Path:
    """Write through a temporary file in the same folder, so a failure leaves no partial file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates private files; give the usual mode
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def write_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    _check_frames(image, 3, "image")
    return _atomic(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


def write_strip(frames: np.ndarray, path: str | os.PathLike) -> Path:
    """All frames side by side in one PNG (a quick look at a video)."""
    _check_frames(frames, 4, "frames")
    return write_png(np.concatenate(list(frames), axis=1), path)


def write_mp4(frames: np.ndarray, path: str | os.PathLike, fps: int = 12) -> Path:
    """H.264 mp4 (yuv420p, so odd sizes are padded by one pixel); 12 fps is NOVA's demo rate."""
    if isinstance(fps, bool) or not isinstance(fps, int) or not 1 <= fps <= 240:
        raise ValueError(f"fps must be an integer from 1 to 240, got {fps!r}")
    _check_frames(frames, 4, "frames")
    height, width = frames.shape[1] + frames.shape[1] % 2, frames.shape[2] + frames.shape[2] % 2
    padded = np.pad(frames, ((0, 0), (0, height - frames.shape[1]), (0, width - frames.shape[2]), (0, 0)), mode="edge")

    def write(tmp: str) -> None:
        with av.open(tmp, mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for frame in padded:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())

    return _atomic(path, write)


def read_mp4(path: str | os.PathLike) -> np.ndarray:
    """Decode an mp4 back to uint8 [T, H, W, 3] (for checks)."""
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
