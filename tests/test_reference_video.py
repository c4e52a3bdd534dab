"""Reference text-to-video and image-to-video on the tiny video checkpoint (DDPM, motion, mixer, KV cache)."""

import numpy as np
import pytest
import torch

from runtime.draws import RecordedDraws, ReplayDraws
from runtime.model import vae as vae_ops

FAST = dict(num_inference_steps=4, num_diffusion_steps=3, disable_progress_bar=True)


@pytest.fixture(scope="module")
def t2v_pipe(tiny_t2v):
    from runtime.reference import ReferencePipeline

    return ReferencePipeline.from_pretrained(tiny_t2v)


def _seeded(seed):
    return torch.Generator().manual_seed(seed)


def test_text_to_video_frames_and_determinism(t2v_pipe):
    a = t2v_pipe("waves on a beach", max_latent_length=3, generator=_seeded(0), **FAST)
    b = t2v_pipe("waves on a beach", max_latent_length=3, generator=_seeded(0), **FAST)
    c = t2v_pipe("waves on a beach", max_latent_length=3, generator=_seeded(1), **FAST)
    assert a.images is None and a.frames.shape == (1, 9, 64, 96, 3) and a.frames.dtype == np.uint8
    assert a.latents.shape == (1, 4, 3, 8, 12)
    assert np.array_equal(a.frames, b.frames) and not np.array_equal(a.frames, c.frames)
    # later frames are generated conditioned on earlier ones, not copies of them
    assert not torch.equal(a.latents[:, :, 0], a.latents[:, :, 1])


def test_ddpm_draws_follow_the_official_order(t2v_pipe):
    recorded = RecordedDraws(_seeded(0))
    t2v_pipe("a bird", max_latent_length=2, draws=recorded, **FAST)
    steps = 4  # tiny-t2v (24 tokens) has no empty mask step at 4 steps
    stochastic = 3 - 1  # DDPM draws for every diffusion step but the last (t = 0)
    assert recorded.tensors[0].shape == (1, 24, 1)  # the token order, once per video
    assert len(recorded.tensors) == 1 + 2 * steps * (1 + stochastic)
    assert all(t.shape == (1, 4, 8, 12) for t in recorded.tensors[1:])


def test_motion_flow_changes_the_video(t2v_pipe):
    slow = t2v_pipe("a car", max_latent_length=2, motion_flow=1, generator=_seeded(0), output_type="latent", **FAST)
    fast = t2v_pipe("a car", max_latent_length=2, motion_flow=9, generator=_seeded(0), output_type="latent", **FAST)
    assert not torch.equal(slow.latents, fast.latents)


def test_extrapolation_beyond_the_training_length(t2v_pipe):
    base_t = t2v_pipe.transformer.config.video_base_size[0]
    out = t2v_pipe("a long shot", max_latent_length=base_t + 2, generator=_seeded(0), output_type="latent",
                   num_inference_steps=2, num_diffusion_steps=2, disable_progress_bar=True)
    assert out.latents.shape[2] == base_t + 2 and torch.isfinite(out.latents).all()


def test_image_to_video_keeps_the_image_latent_as_frame_0(t2v_pipe):
    image = (np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8)
    recorded = RecordedDraws(_seeded(4))
    out = t2v_pipe("a cat walks", image=image, max_latent_length=3, draws=recorded, **FAST)
    assert out.frames.shape == (1, 9, 64, 96, 3)
    # the posterior sample is the first draw; frame 0 is that encoded image
    expected = vae_ops.encode_image(t2v_pipe.vae, image, ReplayDraws(recorded.tensors[:1]))
    torch.testing.assert_close(out.latents[:, :, 0], expected)
    again = t2v_pipe("a cat walks", image=image, max_latent_length=3, generator=_seeded(4), **FAST)
    assert np.array_equal(out.frames, again.frames)


@pytest.mark.parametrize("image, message", [
    (np.zeros((64, 96, 4), np.uint8), r"uint8 \[H, W, 3\] RGB array or a PIL image, got uint8 array of shape"),
    (np.zeros((64, 96, 3), np.float32), "got float32 array"),
    (np.zeros((64, 96), np.uint8), "uint8 array of shape"),
    (np.zeros((0, 96, 3), np.uint8), "uint8 array of shape"),
    ("cat.png", "got str"),
])
def test_bad_images_are_refused(t2v_pipe, image, message):
    with pytest.raises(ValueError, match=message):
        t2v_pipe("a cat", image=image, max_latent_length=3)
