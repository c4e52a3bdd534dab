"""What the package's applications are (conftest.py deploys them; the tests read their bounds from here), and
the checks the tests share."""

import io
import json
import random
import socket
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from runtime.media import read_mp4, write_mp4

TIMEOUT = 60  # seconds, any one HTTP exchange or polling loop

# The "tight" app's video deadline, well below the too-long video of test_api's deadline test (over 12 s here).
# The "nova" app keeps the default deadlines: its ordinary ~1 s videos hit 8 and 12 s ones in loaded CI-like runs.
VIDEO_DEADLINE_S = 4.0
TIGHT = dict(max_ongoing_requests=4, max_queued_requests=4)
MAX_JOBS = 4  # the "nova" app's bound on video jobs (test_web fills it)


# Ports handed to servers come from below the kernel's ephemeral range (32768-60999 by default), where no other
# process's bind(0) (a Ray instance makes dozens) can take one between this probe and the server's own bind, and
# above Ray's worker ports (10002-19999). A probed ephemeral port was once taken in that gap ("Failed to bind").
SERVER_PORTS = range(20000, 32768)


def free_port() -> int:
    while True:
        port = random.choice(SERVER_PORTS)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:  # in use
                continue
        return port


def post(url: str, body: dict, **kwargs) -> requests.Response:
    return requests.post(url, json=body, **{"timeout": TIMEOUT, **kwargs})


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def events(response: requests.Response) -> list[tuple[str, dict]]:
    """The server-sent events of a response: (name, data) each."""
    blocks = response.text.strip().split("\n\n")
    return [(b.split("\n")[0].removeprefix("event: "), json.loads(b.split("\n")[1].removeprefix("data: ")))
            for b in blocks]


def assert_encodes(content: bytes, frames: np.ndarray, fps: int, folder: Path) -> None:
    """A served mp4 holds `frames` (uint8 [T, H, W, 3]) as closely as the same frames encoded here. Not byte for
    byte: libx264 here gives another bitstream for the same frames in a few percent of encodes, whatever its
    thread count and timestamps (measured), so two encodes are compared by their PSNR to the frames."""
    (folder / "served.mp4").write_bytes(content)
    served, here = read_mp4(folder / "served.mp4"), read_mp4(write_mp4(frames, folder / "here.mp4", fps=fps))
    assert served.shape == here.shape == frames.shape
    served_psnr, here_psnr = _psnr(served, frames), _psnr(here, frames)
    assert served_psnr > here_psnr - 0.5, (served_psnr, here_psnr)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255 ** 2 / np.mean((a.astype(np.float64) - b) ** 2)))
