"""The official HEAD call options on the reference pipeline (guidance_scaler.py, pipeline_nova.py, transformer_3d.py,
image_processor.py, scripts/app_nova_t2v.py): their maths, row layouts, draws, shapes and refusals."""

import numpy as np
import PIL.Image
import pytest
import torch

from runtime.draws import RecordedDraws, ReplayDraws
from runtime.guidance import Guidance
from runtime.guidance_plan import GuidancePlan
from runtime.images import fit_image
from runtime.model import vae as vae_ops
from runtime.request import validate_request

T2I = dict(num_inference_steps=4, num_diffusion_steps=3, disable_progress_bar=True, output_type="latent")
T2V = dict(T2I, max_latent_length=2)


@pytest.fixture(scope="module")
def t2v_pipe(tiny_t2v):
    from runtime.reference import ReferencePipeline

    return ReferencePipeline.from_pretrained(tiny_t2v)


@pytest.fixture(scope="module")
def t2v_pipe64(tiny_t2v):
    """In float64: the tiny DDPM video model amplifies float32 rounding (a batch of 3 rows instead of 2 rounds
    matmuls differently) to ~1e-2 after two frames; in float64 passes that are equal in exact maths agree."""
    from runtime.reference import ReferencePipeline

    return ReferencePipeline.from_pretrained(tiny_t2v, dtype=torch.float64)


def _seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def _close(a, b):
    """Equal up to rounding: another number of guidance passes rounds batched matmuls differently."""
    tolerance = 1e-10 if a.dtype == torch.float64 else 1e-4
    torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)


# -------------------------------------------------------------------------------------------------
# guidance maths (runtime.guidance), on random head outputs
# -------------------------------------------------------------------------------------------------
def _blocks(passes, batch=2, seed=0):
    return torch.randn(passes * batch, 24, 16, generator=_seeded(seed))


def test_renorm_bounds_each_samples_norm_ratio():
    out = _blocks(2)
    cond, uncond = out.chunk(2)
    plain = uncond + (cond - uncond) * 5.0
    assert torch.equal(Guidance(5.0, renorm=1).combine(out, 2), plain)
    assert torch.equal(Guidance(5.0, renorm=3).combine(out, 2), plain)  # >= 1: off
    for renorm in (0.0, 0.3, 0.9):
        guided = Guidance(5.0, renorm=renorm).combine(out, 2)
        ratio = guided.flatten(1).norm(dim=1) / plain.flatten(1).norm(dim=1)
        expected = (cond.flatten(1).norm(dim=1) / plain.flatten(1).norm(dim=1)).clamp(renorm, 1)
        torch.testing.assert_close(ratio, expected)  # per sample: |cond| / |guided|, clamped to [renorm, 1]
        assert torch.all(ratio <= 1 + 1e-6) and torch.all(ratio >= renorm - 1e-6)
        assert torch.allclose(guided / plain, ratio.view(-1, 1, 1).expand_as(plain), rtol=1e-5)  # a rescale only


def test_image_guidance_combination():
    out = _blocks(3)
    cond, uncond, imgcond = out.chunk(3)
    guided = Guidance(4.0, image_scale=1.5).combine(out, 3)
    torch.testing.assert_close(guided, uncond + 4.0 * (cond - imgcond) + 1.5 * (imgcond - uncond))
    # g_img = 1: plain CFG with the image pass as the unconditional one
    torch.testing.assert_close(Guidance(4.0, image_scale=1).combine(out, 3), imgcond + 4.0 * (cond - imgcond))


def test_spatiotemporal_combination_and_rows():
    out = _blocks(3)
    cond, uncond, perturbed = out.chunk(3)
    guided = Guidance(4.0, spatiotemporal_scale=2.0).combine(out, 3)
    torch.testing.assert_close(guided, uncond + 4.0 * (cond - uncond) + 2.0 * (cond - perturbed))
    text = torch.randn(4, 5, 8)  # [cond; uncond] rows
    cond_rows, uncond_rows = text[:2], text[2:]
    assert torch.equal(Guidance(4.0, spatiotemporal_scale=2.0).text_rows(text), torch.cat([text, cond_rows]))
    assert torch.equal(Guidance(4.0, image_scale=2.0).text_rows(text), torch.cat([text, uncond_rows]))


def test_truncation_threshold():
    timesteps = np.array([1000.0, 500.0, 499.5, 1.0], np.float32)
    guidance = GuidancePlan(5.0, trunc=500)
    assert guidance.guided_steps(timesteps).tolist() == [True, True, False, False]
    assert guidance.step_scales(timesteps).tolist() == [5.0, 5.0, 1.0, 1.0]  # 1: the graphs take the cond output
    # off from the first timestep below it to the end of the mask step, whatever the later timesteps
    assert guidance.guided_steps(np.array([1000.0, 400.0, 800.0])).tolist() == [True, False, False]
    assert not GuidancePlan(1.0, trunc=500).guided_steps(timesteps).any()  # unguided: nothing to turn off
    assert GuidancePlan(5.0).guided_steps(np.array([1000.0, 0.0])).all()  # 0: never


# -------------------------------------------------------------------------------------------------
# end to end on tiny checkpoints
# -------------------------------------------------------------------------------------------------
def test_guidance_trunc(t2i_pipe):
    base = t2i_pipe("a red kite", generator=_seeded(), **T2I).latents
    unguided = t2i_pipe("a red kite", guidance_scale=1, generator=_seeded(), **T2I).latents
    # flow matching, 3 steps: timesteps 1000, 500.5, 1
    assert torch.equal(t2i_pipe("a red kite", guidance_trunc=1, generator=_seeded(), **T2I).latents, base)
    _close(t2i_pipe("a red kite", guidance_trunc=1e9, generator=_seeded(), **T2I).latents, unguided)
    middle = t2i_pipe("a red kite", guidance_trunc=600, generator=_seeded(), **T2I).latents
    assert not torch.allclose(middle, base, atol=1e-4) and not torch.allclose(middle, unguided, atol=1e-4)
    # unguided, trunc and renorm are accepted and do nothing (the official scaler checks guidance_scale > 1 first)
    assert torch.equal(t2i_pipe("a red kite", guidance_scale=1, guidance_trunc=1e9, guidance_renorm=0.1,
                                generator=_seeded(), **T2I).latents, unguided)


def test_guidance_renorm(t2i_pipe):
    base = t2i_pipe("a red kite", generator=_seeded(), **T2I).latents
    assert torch.equal(t2i_pipe("a red kite", guidance_renorm=1, generator=_seeded(), **T2I).latents, base)
    assert not torch.equal(t2i_pipe("a red kite", guidance_renorm=0.2, generator=_seeded(), **T2I).latents, base)


def _capture_temporal(pipe, monkeypatch):
    calls = []
    temporal = pipe.transformer.temporal

    def spy(tokens, prefix, kv_cache):
        calls.append((tokens.clone(), None if prefix is None else prefix.clone()))
        return temporal(tokens, prefix, kv_cache)

    monkeypatch.setattr(pipe.transformer, "temporal", spy)
    return calls


def test_image_guidance_rows_and_unit_scale_equals_plain_cfg(t2v_pipe64, monkeypatch):
    plain = t2v_pipe64("a cat walks", generator=_seeded(), **T2V).latents
    calls = _capture_temporal(t2v_pipe64, monkeypatch)
    recorded = RecordedDraws(_seeded())
    unit = t2v_pipe64("a cat walks", image_guidance_scale=1, draws=recorded, **T2V).latents
    # u + g (c - i) + 1 (i - u) = i + g (c - i), and the image pass is plain CFG's unconditional pass
    _close(unit, plain)
    assert len(recorded.tensors) == 1 + 2 * 4 * 3  # the draws do not depend on the passes
    (tokens0, prefix), (tokens1, _) = calls
    cond, uncond, imgcond = tokens1.chunk(3)
    bos = t2v_pipe64.transformer.mask_embed.bos_token
    assert torch.equal(uncond, bos.expand_as(uncond))  # raw BOS instead of the previous frame
    assert torch.equal(imgcond, cond) and not torch.equal(cond, uncond)
    assert torch.equal(tokens0.chunk(3)[1], bos.expand_as(cond))  # also at t = 0, without the embeddings
    p_cond, p_uncond, p_img = prefix.chunk(3)
    assert torch.equal(p_img, p_uncond) and not torch.equal(p_cond, p_uncond)  # null text for the image pass
    assert not torch.equal(t2v_pipe64("a cat walks", image_guidance_scale=2.5, generator=_seeded(), **T2V).latents,
                           plain)


def test_spatiotemporal_pass_is_a_no_op_at_head(t2v_pipe64, monkeypatch):
    plain = t2v_pipe64("a cat walks", generator=_seeded(), **T2V).latents
    calls = _capture_temporal(t2v_pipe64, monkeypatch)
    guided = t2v_pipe64("a cat walks", spatiotemporal_guidance_scale=3, generator=_seeded(), **T2V).latents
    _close(guided, plain)
    tokens, prefix = calls[0]
    assert tokens.shape[0] == 3  # a third pass is computed ...
    assert torch.equal(prefix.chunk(3)[2], prefix.chunk(3)[0])  # ... on the conditional inputs again
    assert torch.equal(calls[1][0].chunk(3)[2], calls[1][0].chunk(3)[0])


def test_flow_shift(t2i_pipe, t2v_pipe):
    base = t2i_pipe("a red kite", generator=_seeded(), **T2I).latents
    assert torch.equal(t2i_pipe("a red kite", flow_shift=1.0, generator=_seeded(), **T2I).latents, base)  # config's
    assert not torch.equal(t2i_pipe("a red kite", flow_shift=3.0, generator=_seeded(), **T2I).latents, base)
    recorded = RecordedDraws(_seeded())
    with pytest.raises(ValueError, match="^flow_shift needs a flow-matching scheduler; this checkpoint samples "
                                         "with DDPMScheduler"):
        t2v_pipe("a cat", flow_shift=3.0, draws=recorded, **T2V)
    assert recorded.tensors == []  # refused before any work


def test_latents_continue_a_video_from_the_last_given_frame(t2v_pipe):
    first = t2v_pipe("waves", generator=_seeded(), **dict(T2V, max_latent_length=3)).latents  # [1, 4, 3, h, w]
    given = [first[:, :, i] for i in range(3)]
    out = t2v_pipe("waves", latents=given, generator=_seeded(1), **dict(T2V, max_latent_length=3))
    assert out.latents.shape == (1, 4, 5, 8, 12) and torch.equal(out.frames, out.latents)
    assert all(torch.equal(out.latents[:, :, i], given[i]) for i in range(3))  # prefilled frames come back as given
    # only the last given frame conditions the new ones; the others are prepended to the output
    other = t2v_pipe("waves", latents=[torch.zeros_like(given[0]), given[2]], generator=_seeded(1),
                     **dict(T2V, max_latent_length=3)).latents
    assert other.shape[2] == 4 and torch.equal(other[:, :, 2:], out.latents[:, :, 3:])
    # one latent frame: nothing is generated, nothing drawn
    recorded = RecordedDraws(_seeded())
    alone = t2v_pipe("waves", latents=given[:2], draws=recorded, **dict(T2V, max_latent_length=1))
    assert torch.equal(alone.latents, first[:, :, :2]) and recorded.tensors == []
    decoded = t2v_pipe("waves", latents=given, generator=_seeded(1), **dict(T2V, max_latent_length=2,
                                                                           output_type="np"))
    assert decoded.frames.shape == (1, 1 + 4 * 3, 64, 96, 3)  # 4 latents through the video VAE


def test_image_with_one_latent_frame_returns_the_encoded_image(t2v_pipe):
    image = (np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8)
    recorded = RecordedDraws(_seeded())
    out = t2v_pipe("a cat", image=image, draws=recorded, **dict(T2V, max_latent_length=1))
    assert len(recorded.tensors) == 1 and out.latents.shape == (1, 4, 1, 8, 12)
    expected = vae_ops.encode_image(t2v_pipe.vae, image, ReplayDraws(recorded.tensors))
    torch.testing.assert_close(out.latents[:, :, 0], expected)


def test_any_size_image_is_centre_cropped_and_resized(t2v_pipe):
    picture = (np.random.default_rng(1).random((90, 100, 3)) * 255).astype(np.uint8)
    fitted = fit_image(picture, 64, 96)
    a = t2v_pipe("a cat", image=picture, generator=_seeded(), **T2V).latents
    b = t2v_pipe("a cat", image=fitted, generator=_seeded(), **T2V).latents
    c = t2v_pipe("a cat", image=PIL.Image.fromarray(picture), generator=_seeded(), **T2V).latents
    assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("size, box", [((7, 10), (0, 0, 10, 6)),  # tall for 4x6: full width, 6 rows from the top
                                       ((9, 10), (0, 1, 10, 7)),  # offset (9 - 6) // 2 = 1
                                       ((5, 20), (6, 0, 13, 5))])  # wide: int(5 * 1.5) = 7 columns from (20 - 7) // 2
def test_fit_image_is_pils_centre_crop_and_bilinear_resize(size, box):
    h, w = size
    picture = (np.arange(h * w * 3) * 37 % 256).astype(np.uint8).reshape(h, w, 3)
    expected = np.array(PIL.Image.fromarray(picture).crop(box).resize((6, 4), PIL.Image.Resampling.BILINEAR))
    fitted = fit_image(picture, 4, 6)
    assert fitted.shape == (4, 6, 3) and fitted.dtype == np.uint8 and np.array_equal(fitted, expected)
    rgba = PIL.Image.fromarray(np.dstack([picture, np.full((h, w), 255, np.uint8)]))
    assert np.array_equal(fit_image(rgba, 4, 6), expected)
    assert np.array_equal(fit_image(picture, h, w), picture)  # the model size: untouched


def test_output_types(t2i_pipe, t2v_pipe):
    outs = {kind: t2i_pipe("a boat", generator=_seeded(), **dict(T2I, output_type=kind)) for kind in
            ("np", "pil", "pt", "latent")}
    assert outs["np"].images.shape == (1, 64, 64, 3) and outs["np"].images.dtype == np.uint8
    pil = outs["pil"].images
    assert isinstance(pil, list) and len(pil) == 1 and pil[0].mode == "RGB" and pil[0].size == (64, 64)
    assert np.array_equal(np.asarray(pil[0]), outs["np"].images[0])
    pt = outs["pt"].images
    assert isinstance(pt, torch.Tensor) and pt.shape == (1, 3, 64, 64) and pt.dtype == torch.float32
    assert np.array_equal(vae_ops.to_uint8(pt), outs["np"].images)
    latent = outs["latent"]
    assert latent.images is None and latent.frames.shape == (1, 4, 1, 8, 8)
    assert torch.equal(latent.frames, latent.latents)  # officially the latents come back as `frames`
    frames_pil = t2v_pipe("waves", generator=_seeded(), **dict(T2V, output_type="pil")).frames
    assert isinstance(frames_pil, np.ndarray) and frames_pil.shape == (1, 5, 64, 96, 3)  # videos stay arrays
    frames_pt = t2v_pipe("waves", generator=_seeded(), **dict(T2V, output_type="pt")).frames
    assert frames_pt.shape == (1, 3, 5, 64, 96) and np.array_equal(vae_ops.to_uint8(frames_pt), frames_pil)


# -------------------------------------------------------------------------------------------------
# refusals and the runner's view
# -------------------------------------------------------------------------------------------------
LATENT = torch.zeros(1, 4, 8, 12)


@pytest.mark.parametrize("kwargs, message", [
    ({"image_guidance_scale": 1, "spatiotemporal_guidance_scale": 1},
     r"image_guidance_scale and spatiotemporal_guidance_scale cannot be combined"),
    ({"image_guidance_scale": 2, "guidance_scale": 1}, r"image_guidance_scale needs guidance_scale > 1"),
    ({"spatiotemporal_guidance_scale": 2, "guidance_scale": 0.5}, r"spatiotemporal_guidance_scale needs guidance_"),
    ({"image_guidance_scale": -1}, r"image_guidance_scale must be >= 0, got -1"),
    ({"guidance_trunc": -5}, r"guidance_trunc must be >= 0"),
    ({"guidance_renorm": float("inf")}, r"guidance_renorm must be a finite number"),
    ({"flow_shift": 0}, r"flow_shift must be > 0 \(None keeps the scheduler's shift\), got 0"),
    ({"flow_shift": "3"}, r"flow_shift must be a finite number"),
    ({"latents": LATENT}, r"latents must be a non-empty list of \[1, 4, 8, 12\] latent frames"),
    ({"latents": []}, r"latents must be a non-empty list"),
    ({"latents": [LATENT, torch.zeros(2, 4, 8, 12)]}, r"latents\[1\] must have shape \[1, 4, 8, 12\]"),
    ({"latents": [LATENT], "image": np.zeros((64, 96, 3), np.uint8)}, r"give at most one of image and latents"),
    ({"output_type": "pillow"}, r"output_type must be one of 'pil', 'np', 'pt', 'latent'"),
])
def test_refusals_name_the_problem(t2v_pipe, kwargs, message):
    recorded = RecordedDraws(_seeded())
    with pytest.raises(ValueError, match=f"^{message}"):
        t2v_pipe("a cat", draws=recorded, **dict(T2V, **kwargs))
    assert recorded.tensors == []


def test_request_lists_what_the_runner_does_not_take(t2v_pipe):
    config = t2v_pipe.config
    plain = validate_request(config, "a cat", flow_shift=2.0, guidance_trunc=100, guidance_scale=1)
    assert plain.extra_options == () and plain.guidance_passes == 1 and plain.flow_shift == 2.0
    request = validate_request(config, "a cat", guidance_trunc=100, guidance_renorm=0.5, image_guidance_scale=1.5,
                               latents=[LATENT], max_latent_length=2)
    assert request.extra_options == ("guidance_trunc", "guidance_renorm", "image_guidance_scale", "latents")
    assert request.guidance_passes == 3
    assert validate_request(config, "a cat").guidance_passes == 2


def test_runner_takes_flow_shift_and_refuses_the_rest_by_name(tiny_t2i, t2i_pipe):
    from runtime.graphs.profile import BuildProfile
    from runtime.runner import NOVARunner

    runner = NOVARunner.from_checkpoint(tiny_t2i, BuildProfile(min_mask_steps=4))
    steps = dict(num_inference_steps=4, num_diffusion_steps=3)
    ours = runner("a red kite", seed=0, flow_shift=3.0, **steps)
    theirs = t2i_pipe("a red kite", flow_shift=3.0, generator=_seeded(), disable_progress_bar=True, **steps)
    np.testing.assert_allclose(ours.latents, theirs.latents.numpy(), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="^guidance_renorm runs in a diffusion loop over the whole token grid; these "
                                         r"engines were built for .* \(rebuild with --guidance-renorm\)$"):
        runner("a red kite", seed=0, guidance_renorm=0.5, **steps)
    with pytest.raises(ValueError, match=r"^image_guidance_scale needs a third guidance pass; .* \(rebuild with "
                                         r"--third-guidance-pass\)$"):
        runner("a red kite", seed=0, image_guidance_scale=1.5, **steps)


# the compiled runner: a CFG build serves unguided and truncated requests in its denoise graphs (per-step
# guidance scales, <= 1 meaning the conditional output), ONNX Runtime engines as a deployment runs them
@pytest.mark.parametrize("options", [dict(guidance_scale=1.0), dict(guidance_trunc=600), dict(guidance_trunc=1e9)],
                         ids=["unguided", "trunc-middle", "trunc-all"])
def test_compiled_runner_guidance_off_and_truncated_equal_the_reference(t2i_engines, t2i_pipe, options):
    from runtime.runner import NOVARunner

    runner = NOVARunner.from_engines(t2i_engines)  # CFG on, the loop unrolled for 4 diffusion steps
    steps = dict(num_inference_steps=8, num_diffusion_steps=4)
    ours = runner("a red kite", seed=0, **steps, **options)
    theirs = t2i_pipe("a red kite", generator=_seeded(), disable_progress_bar=True, **steps, **options)
    np.testing.assert_allclose(ours.latents, theirs.latents.numpy(), rtol=0, atol=1e-4)
    plain = runner("a red kite", seed=0, **steps)  # and the option did something
    assert np.abs(plain.latents - ours.latents).max() > 1e-3
    fallback = runner("a red kite", seed=0, num_inference_steps=8, num_diffusion_steps=3, **options)  # per step
    reference = t2i_pipe("a red kite", generator=_seeded(), disable_progress_bar=True, num_inference_steps=8,
                         num_diffusion_steps=3, **options)
    np.testing.assert_allclose(fallback.latents, reference.latents.numpy(), rtol=0, atol=1e-4)


def test_compiled_runner_continues_given_latents_like_the_reference(t2v_engines, t2v_pipe):
    from runtime.runner import NOVARunner

    runner = NOVARunner.from_engines(t2v_engines)
    options = dict(num_inference_steps=4, num_diffusion_steps=4, max_latent_length=3)
    given = list(t2v_pipe("waves", generator=_seeded(), disable_progress_bar=True, output_type="latent",
                          **options).latents.unbind(2))
    ours = runner("waves", seed=1, latents=given, **options)
    theirs = t2v_pipe("waves", latents=given, generator=_seeded(1), disable_progress_bar=True, output_type="np",
                      **options)
    assert ours.latents.shape == theirs.latents.shape == (1, 4, 5, 8, 12)  # 3 given, then 2 generated
    assert all(np.array_equal(ours.latents[:, :, i], given[i].numpy()) for i in range(3))
    error = np.abs(ours.latents - theirs.latents.numpy()).max(axis=(0, 1, 3, 4))
    assert error[3] < 1e-3, error  # the first generated frame (later ones: the model's rounding amplification)
    assert ours.frames.shape == theirs.frames.shape == (1, 17, 64, 96, 3)  # 5 latents through the video VAE
    streamed = np.concatenate(list(runner.stream("waves", seed=1, latents=given, **options)), axis=1)
    assert np.array_equal(streamed, ours.frames)


def test_compiled_runner_takes_the_official_output_types(t2i_engines):
    from runtime.runner import NOVARunner

    runner = NOVARunner.from_engines(t2i_engines)
    steps = dict(seed=0, num_inference_steps=8, num_diffusion_steps=4)
    arrays = runner("a cat", **steps)  # "np": what a service needs
    pil = runner("a cat", output_type="pil", disable_progress_bar=True, **steps)  # the official default's type
    assert len(pil.images) == 1 and np.array_equal(np.asarray(pil.images[0]), arrays.images[0])
    latent = runner("a cat", output_type="latent", **steps)  # nothing decoded
    assert latent.images is None and latent.frames is None and np.array_equal(latent.latents, arrays.latents)
    with pytest.raises(ValueError, match="output_type must be 'np', 'pil' or 'latent', got 'pt'"):
        runner("a cat", output_type="pt", **steps)
