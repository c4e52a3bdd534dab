"""The graph modules (runtime.graphs) compute exactly the reference semantics (torch only, no export)."""

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from export.validate import temporal_sequence
from runtime.draws import RecordedDraws, ReplayDraws
from runtime.configs import CheckpointConfigs
from runtime.graphs import BuildProfile, Dim, Geometry, build_specs, frame_position, run_module
from runtime.graphs.common import ModuleCache, fp32_islands, time_embedding
from runtime.graphs.profile import component_precision, max_tokens_per_step
from runtime.model import vae as vae_ops
from runtime.model.transformer import patchify, unpatchify
from runtime.schedules import SamplerTable, load_scheduler, mask_schedule


class _Checkpoint:
    """A checkpoint's configs and its modules, loaded once per test module."""

    def __init__(self, folder):
        self.configs, self.modules = CheckpointConfigs.read(folder), ModuleCache(folder)


@pytest.fixture(scope="module")
def t2i(tiny_t2i):
    return _Checkpoint(tiny_t2i)


@pytest.fixture(scope="module")
def t2v(tiny_t2v):
    return _Checkpoint(tiny_t2v)


def _specs(checkpoint, precision="fp32", **profile):
    return build_specs(checkpoint.configs, BuildProfile(**{"min_mask_steps": 4, **profile}), precision,
                       modules=checkpoint.modules)


@pytest.mark.parametrize("which", ["t2i", "t2v"])
def test_declarations_match_the_modules(which, request):
    checkpoint = request.getfixturevalue(which)
    specs = _specs(checkpoint, prompts=2, max_latent_length=3 if which == "t2v" else None)
    assert list(specs)[:2] == ["text_encoder", "temporal_prefill"]
    assert ("temporal_step" in specs) == ("vae_encoder" in specs) == (which == "t2v")
    for spec in specs.values():
        module = spec.build()
        for point in ("min", "max"):
            dims = spec.dims_at(point)
            inputs = spec.sample(dims, torch.Generator().manual_seed(0))
            assert list(inputs) == [t.name for t in spec.inputs], spec.name
            for t in spec.inputs:
                assert tuple(inputs[t.name].shape) == t.concrete(dims) and inputs[t.name].dtype == t.torch_dtype, t
            outputs = run_module(spec, module, inputs)
            for t in spec.outputs:
                assert tuple(outputs[t.name].shape) == t.concrete(dims), (spec.name, t.name)
                assert outputs[t.name].dtype == t.torch_dtype, (spec.name, t.name)


@pytest.mark.parametrize("cfg", [True, False])
@pytest.mark.parametrize("which", ["t2i", "t2v"])
def test_spatial_bucketed_slots_equal_reference_gather(which, cfg, request):
    checkpoint = request.getfixturevalue(which)
    spec = _specs(checkpoint, cfg=cfg, prompts=2)["spatial"]
    module, model = spec.build(), checkpoint.modules("transformer", "fp32")
    g = module.geometry
    gen = torch.Generator().manual_seed(3)
    order = torch.stack([torch.randperm(g.num_tokens, generator=gen) for _ in range(g.batch)])
    indicator = torch.randn(g.model_batch, g.num_video_tokens, g.width, generator=gen)
    for known in (0, 1, g.known_bucket, g.num_tokens // 2, g.num_tokens - 1):
        known_ids = order[:, :known]
        mask = torch.ones(g.batch, g.num_tokens, 1).scatter(1, known_ids.unsqueeze(-1), 0)
        canvas = unpatchify(patchify(torch.randn(g.batch, g.channels, *g.latent_size, generator=gen), g.patch) * (1 - mask),
                            g.patch, *g.latent_size)
        selected = order[:, (known + torch.arange(g.max_tokens_per_step)) % g.num_tokens]
        with torch.no_grad():
            ids = torch.cat([known_ids, known_ids]) if cfg else known_ids
            z = model.spatial(canvas, mask, indicator, ids)
            rows = torch.cat([selected, selected]) if cfg else selected
            expected = z.gather(1, rows.unsqueeze(-1).expand(-1, -1, g.width))
        slots = g.known_slots(known)
        assert slots >= known and (slots % g.known_bucket == 0 or slots == g.num_tokens)
        got = module(canvas, order[:, :slots], torch.tensor([known]), indicator, selected)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-5, msg=f"k = {known}")


def test_prefill_equals_reference_condition_and_temporal(t2i):
    spec = _specs(t2i)["temporal_prefill"]
    module, model = spec.build(), t2i.modules("transformer", "fp32")
    inputs = spec.sample({}, torch.Generator().manual_seed(1))
    inputs["text_lengths"] = torch.tensor([5, 0])
    with torch.no_grad():
        rows = [inputs["text_hidden"][0, :5], None]
        condition = model.condition(model.text_embed.fill_null(rows))
        tokens = model.frame_tokens(None, model.video_pos_embed(1)[0], 1)
        expected = model.temporal(torch.cat([tokens, tokens]), condition, None)
    got = run_module(spec, module, inputs)["indicator"]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_time_embedding_and_frame_position_equal_video_pos_embed(t2v):
    model = t2v.modules("transformer", "fp32")
    base_t = t2v.configs.transformer.video_base_size[0]
    for frames in (1, 2, 5, 9, 16, 23, 37):
        positions = torch.arange(frames, dtype=torch.float32) / (frames / base_t)  # as VideoPosEmbed.forward
        table = model.video_pos_embed(frames)
        for k in range(frames):
            position = torch.from_numpy(frame_position(k, frames, base_t))
            assert torch.equal(position, positions[k:k + 1]), (frames, k)
            # one row instead of the whole table: the same math, matmul rounding of another batch size
            torch.testing.assert_close(time_embedding(model, position), table[k], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", [True, False])
def test_temporal_cache_across_frames_equals_reference_kv_cache(t2v, cfg):
    """Prefill + 3 steps of the torch graph modules, cache carried, vs the reference's growing KVCache."""
    specs = _specs(t2v, cfg=cfg, max_latent_length=4)
    prefill, step = specs["temporal_prefill"], specs["temporal_step"]
    run = lambda spec, module: lambda feed: [v.numpy() for v in run_module(  # noqa: E731
        spec, module, {k: torch.from_numpy(np.asarray(v)) for k, v in feed.items()}).values()]
    report = temporal_sequence(prefill, step, run(prefill, prefill.build()), run(step, step.build()),
                               t2v.modules("transformer", "fp32"), Geometry.from_config(t2v.configs.transformer, BuildProfile(
                                   cfg=cfg, max_latent_length=4, min_mask_steps=4)), frames=4)
    assert report["passed"] and len(report["indicator"]) == 4
    assert max(e["max_abs"] for e in report["indicator"]) < 1e-5


def test_step_writes_only_this_frames_cache_positions(t2v):
    spec = _specs(t2v, max_latent_length=4)["temporal_step"]
    module = spec.build()
    inputs = spec.sample({}, torch.Generator().manual_seed(2))
    length, nv = int(inputs["cache_length"]), module.geometry.num_video_tokens
    out = run_module(spec, module, inputs)
    for name in ("k_cache", "v_cache"):
        new, old = out[name + "_out"], inputs[name]
        assert torch.equal(new[:, :, :, :length], old[:, :, :, :length])
        assert torch.equal(new[:, :, :, length + nv:], old[:, :, :, length + nv:])
        assert not torch.equal(new[:, :, :, length:length + nv], old[:, :, :, length:length + nv])


@pytest.mark.parametrize("which", ["t2i", "t2v"])  # flow matching; DDPM with noise and clipping
def test_denoise_steps_equal_reference_denoise_loop(which, request):
    checkpoint = request.getfixturevalue(which)
    spec = _specs(checkpoint)["denoise"]
    module, g = spec.build(), _specs(checkpoint)["denoise"].build().geometry
    from runtime.guidance import Guidance
    from runtime.reference import ReferencePipeline

    pipe = ReferencePipeline(checkpoint.modules("transformer", "fp32"), None, None, None,
                             load_scheduler(checkpoint.configs.scheduler))
    sampler = SamplerTable.from_config(checkpoint.configs.scheduler, 4)
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(g.model_batch, g.num_tokens, g.width, generator=gen)
    x0 = torch.randn(g.batch, g.channels, *g.latent_size, generator=gen)
    selected = torch.randperm(g.num_tokens, generator=gen)[: g.max_tokens_per_step].view(1, -1, 1)

    recorded = RecordedDraws(torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = pipe.denoise(z, x0.clone(), selected, sampler, Guidance(5.0), recorded)
    rows = selected[..., 0]
    take = lambda t: patchify(t, g.patch).gather(1, rows.unsqueeze(-1).expand(-1, -1, g.token_dim))  # noqa: E731
    x, noises = take(x0), iter(recorded.tensors)
    clip = torch.tensor([sampler.clip_range if sampler.clip_range is not None else 3.0e38])
    z_sel = z.gather(1, torch.cat([rows, rows]).unsqueeze(-1).expand(-1, -1, g.width))
    for j, timestep in enumerate(torch.from_numpy(sampler.timesteps)):
        noise = take(next(noises)) if sampler.draws_noise(j) else torch.zeros_like(x)
        x = module(x, z_sel, timestep.reshape(1), torch.from_numpy(sampler.coefficients[j]), clip, noise,
                   torch.tensor([5.0]))
    assert (sampler.clip_range is not None) == (which == "t2v")
    # Rounding only: the graph embeds the step's timestep once (a 1-row product), the reference once per row
    # (M rows), and MKL rounds products of 1 to 3 rows differently; DDPM's x0 = (x - sqrt(1 - abar) eps) /
    # sqrt(abar) amplifies that at high timesteps (measured 1.3e-6 flow matching, 1.1e-5 DDPM).
    torch.testing.assert_close(x, take(unpatchify(expected, g.patch, *g.latent_size)), rtol=1e-5, atol=5e-5)


def test_place_equals_reference_canvas_update(t2i):
    spec = _specs(t2i)["place"]
    module = spec.build()
    g = module.geometry
    gen = torch.Generator().manual_seed(6)
    canvas = torch.randn(g.batch, g.channels, *g.latent_size, generator=gen)
    sample = torch.randn(g.batch, g.num_tokens, g.token_dim, generator=gen)
    order = torch.randperm(g.num_tokens, generator=gen).view(1, -1)
    count = g.max_tokens_per_step - 1  # one padded row
    selected, valid = order[:, : g.max_tokens_per_step], torch.arange(g.max_tokens_per_step).view(1, -1) < count
    pred_mask = torch.zeros(g.batch, g.num_tokens, 1).scatter(1, selected[:, :count, None], 1)
    expected = canvas + unpatchify(sample * pred_mask, g.patch, *g.latent_size)
    x = sample.gather(1, selected.unsqueeze(-1).expand(-1, -1, g.token_dim))
    assert torch.equal(module(canvas, x, selected, valid), expected)


def test_vae_decoder_equals_reference_decode(t2i, t2v):
    for checkpoint, shape in ((t2i, (2, 4, 1, 8, 8)), (t2v, (1, 4, 3, 8, 12))):
        spec = _specs(checkpoint, prompts=2, min_mask_steps=64, max_latent_length=3 if checkpoint is t2v else None)
        module = spec["vae_decoder"].build()
        latents = torch.randn(shape, generator=torch.Generator().manual_seed(7))
        expected = vae_ops.to_uint8(vae_ops.decode(checkpoint.modules("vae", "fp32"), latents))
        with torch.no_grad():
            got = module(latents[:, :, 0] if shape[2] == 1 else latents).numpy()
        assert got.shape == expected.shape and got.dtype == np.uint8
        assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1 and (got != expected).mean() < 1e-3


def test_video_vae_windows_of_every_length_equal_reference_decode(t2v):
    specs = _specs(t2v, min_mask_steps=64, max_latent_length=9)
    assert specs["vae_decoder"].dims["window"] == Dim("window", 2, 5, 5)
    vae = t2v.modules("vae", "fp32")
    for frames in (1, 2, 4, 5):
        spec = specs["vae_decoder_single" if frames == 1 else "vae_decoder"]
        latents = torch.randn(1, 4, frames, 8, 12, generator=torch.Generator().manual_seed(frames))
        expected = vae_ops.to_uint8(vae_ops.decode(vae, latents))
        got = run_module(spec, spec.build(), {"latents": latents})["pixels"].numpy()
        assert got.shape == expected.shape == spec.outputs[0].concrete({"window": frames, "vae_batch": 1})
        assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


def test_vae_encoder_equals_reference_encode_image(t2v):
    module = _specs(t2v, max_latent_length=3)["vae_encoder"].build()
    image = (np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8)
    noise = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(8))
    expected = vae_ops.encode_image(t2v.modules("vae", "fp32"), image, ReplayDraws([noise]))
    with torch.no_grad():
        got = module(torch.from_numpy(image)[None], noise)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_fp32_islands_keep_fp16_layer_norm_finite():
    x = torch.full((2, 64), 300.0).half() + torch.arange(64).half()  # variance overflows fp16 sums
    weight, bias = torch.ones(64), torch.zeros(64)
    with fp32_islands(torch.float16):
        y = F.layer_norm(x, (64,), weight, bias)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), F.layer_norm(x.float(), (64,), weight, bias), rtol=1e-3, atol=1e-3)


def test_profile_geometry_and_precision_policy(t2i, t2v):
    assert component_precision("text_encoder", "fp16") == "fp32"
    assert component_precision("text_encoder", "fp16", backend="tensorrt") == "bf16"
    assert component_precision("spatial", "fp16") == "fp16"
    assert component_precision("vae_decoder", "fp16", {"vae_decoder": "bf16"}) == "bf16"
    g = Geometry.from_config(t2v.configs.transformer, BuildProfile(prompts=2, images_per_prompt=2, min_mask_steps=64))
    assert (g.batch, g.model_batch, g.text_batch, g.max_latent_length) == (4, 8, 4, 9)
    assert g.cache_length == 258 + 9 * 6
    with pytest.raises(ValueError, match="image checkpoint"):
        Geometry.from_config(t2i.configs.transformer, BuildProfile(max_latent_length=2))
    with pytest.raises(ValueError, match="prompts must be an integer"):
        BuildProfile(prompts=0)
    with pytest.raises(ValueError, match="unknown graph name"):
        build_specs(t2i.configs, BuildProfile(), "fp16", {"vae": "fp32"})


@pytest.mark.parametrize("tokens", [16, 24, 1440])
def test_max_tokens_per_step_covers_every_longer_schedule(tokens):
    for minimum in (1, 4, 16, 64):
        n_max = max_tokens_per_step(tokens, minimum)
        assert all(max(mask_schedule(tokens, k)) <= n_max for k in range(minimum, min(tokens, 200) + 1))
