"""PNG / mp4 writers and the reference command line."""

import numpy as np
import pytest
from PIL import Image

from runtime.__main__ import main
from runtime.media import read_mp4, write_mp4, write_png, write_strip


def _smooth_frames(count, height, width):
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([((x + 4 * t) * 255 // (width + 4 * count)) * np.ones((height, width))
                     for t in range(count)]).astype(np.uint8)[..., None].repeat(3, axis=-1)


def test_mp4_round_trip_keeps_frame_count_and_content(tmp_path):
    frames = _smooth_frames(9, 64, 96)
    path = write_mp4(frames, tmp_path / "clip.mp4", fps=12)
    decoded = read_mp4(path)
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames).mean() < 3  # lossy codec, smooth content


def test_odd_sizes_are_padded_for_yuv420(tmp_path):
    assert read_mp4(write_mp4(_smooth_frames(3, 33, 35), tmp_path / "odd.mp4")).shape == (3, 34, 36, 3)


def test_png_and_strip(tmp_path):
    frames = _smooth_frames(4, 8, 12)
    assert np.array_equal(np.asarray(Image.open(write_png(frames[0], tmp_path / "a.png"))), frames[0])
    assert np.asarray(Image.open(write_strip(frames, tmp_path / "s.png"))).shape == (8, 48, 3)


def test_bad_frames_are_refused_and_nothing_is_written(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_mp4(np.zeros((2, 8, 8, 3), np.float32), tmp_path / "x.mp4")
    assert list(tmp_path.iterdir()) == []


def test_reference_command_writes_a_png(tiny_t2i, tmp_path, capsys):
    out = tmp_path / "cat.png"
    code = main(["reference", "--checkpoint", str(tiny_t2i), "--prompt", "a cat", "--steps", "4",
                 "--diffusion-steps", "2", "--out", str(out)])
    assert code == 0 and np.asarray(Image.open(out)).shape == (64, 64, 3)
    assert main(["reference", "--checkpoint", str(tiny_t2i), "--prompt", "a cat", "--steps", "0",
                 "--out", str(tmp_path / "bad.png")]) == 2
    assert "--num-inference-steps must be an integer >= 1" in capsys.readouterr().err
    assert not (tmp_path / "bad.png").exists()
