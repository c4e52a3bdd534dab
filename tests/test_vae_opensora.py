"""Open-Sora-Plan causal video VAE (runtime/model/vae_opensora.py): checkpoint contract and semantics.

Numerical parity with NOVA's official class was checked outside the repo (bit-identical in fp32); these
tests pin the structure and the behaviour the runtime relies on, with small seeded random weights.
"""

import json

import pytest
import torch
from safetensors.torch import save_file
from torch.testing import assert_close

from runtime.model.vae_opensora import (
    AutoencoderKLOpenSora,
    CausalConv3d,
    OSP480_VAE_CONFIG,
    TINY_VAE_CONFIG,
)


@pytest.fixture(scope="module")
def vae() -> AutoencoderKLOpenSora:
    torch.manual_seed(0)
    model = AutoencoderKLOpenSora(**TINY_VAE_CONFIG).eval()
    with torch.no_grad():  # move norms and biases off their identity init
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _latents(t: int, h: int = 4, w: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(1, 4, t, h, w, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _decode(vae: AutoencoderKLOpenSora, z: torch.Tensor) -> torch.Tensor:
    return vae.decode(z.clone()).sample


def test_osp480_keys_and_shapes():
    with torch.device("meta"):
        model = AutoencoderKLOpenSora(**OSP480_VAE_CONFIG)
    assert sum(p.numel() for p in model.parameters()) == 239_189_991  # 239.19 M, as measured upstream
    decoder_side = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("decoder.", "post_quant")))
    assert round(decoder_side / 1e6, 2) == 144.79
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(shapes) == 248
    expected = {
        "encoder.conv_in.weight": (128, 3, 3, 3),  # 2-D: frames run through the first stages per frame
        "encoder.down_blocks.0.downsamplers.0.conv.weight": (128, 128, 3, 3),
        "encoder.down_blocks.1.downsamplers.0.conv.weight": (256, 256, 3, 3, 3),  # first temporal /2
        "encoder.down_blocks.1.resnets.0.conv_shortcut.weight": (256, 128, 1, 1),
        "encoder.conv_out.weight": (8, 512, 3, 3, 3),
        "quant_conv.weight": (8, 8, 1, 1, 1),
        "post_quant_conv.weight": (4, 4, 1, 1, 1),
        "decoder.conv_in.weight": (512, 4, 3, 3, 3),
        "decoder.mid_block.attentions.0.to_q.weight": (512, 512),
        "decoder.mid_block.attentions.0.to_out.0.bias": (512,),
        "decoder.mid_block.attentions.0.group_norm.weight": (512,),
        "decoder.up_blocks.0.upsamplers.0.conv.weight": (512, 512, 3, 3, 3),  # x2 time + space
        "decoder.up_blocks.2.upsamplers.0.conv.weight": (256, 256, 1, 3, 3),  # x2 space only
        "decoder.up_blocks.2.resnets.0.conv_shortcut.weight": (256, 512, 1, 1, 1),
        "decoder.up_blocks.3.resnets.2.conv2.weight": (128, 128, 3, 3, 3),  # layers_per_block + 1
        "decoder.conv_out.weight": (3, 128, 3, 3, 3),
    }
    assert {k: shapes.get(k) for k in expected} == expected
    assert not any(k.startswith("decoder.up_blocks.3.upsamplers") for k in shapes)
    assert model.config.scaling_factor == 0.18215 and model.config.shift_factor is None


@pytest.mark.parametrize("t_lat, t_out", [(1, 1), (5, 17), (9, 33), (7, 17)])
def test_decoded_frame_counts(vae, t_lat, t_out):
    # 7 latents: only windows that fit are decoded, so the last 2 latents are dropped (official behaviour).
    assert _decode(vae, _latents(t_lat)).shape == (1, 3, t_out, 32, 48)


def test_image_latent_decodes_to_image(vae):
    z = _latents(1)
    image = _decode(vae, z[:, :, 0])
    assert image.shape == (1, 3, 32, 48)
    assert_close(image, _decode(vae, z)[:, :, 0])


def test_tiled_decode_is_windows_of_five(vae):
    z = _latents(9)
    tiled = _decode(vae, z)
    # Window [0:5] gives frames 0..16; window [4:9] gives 17 frames whose first (latent 4 again) is dropped.
    assert_close(tiled[:, :, :17], _decode(vae, z[:, :, :5]))
    assert_close(tiled[:, :, 17:], _decode(vae, z[:, :, 4:9])[:, :, 1:])
    # Windows are not seamless: one untiled pass (GroupNorm over all 9 latents) gives other frames.
    vae.latent_min_t = 9
    try:
        whole = _decode(vae, z)
    finally:
        vae.latent_min_t = 5
    assert whole.shape == tiled.shape
    assert not torch.allclose(whole, tiled, atol=1e-3)


def test_causal_conv_never_reads_the_future():
    torch.manual_seed(0)
    for conv in (CausalConv3d(8, 8, 3, 1, 1), CausalConv3d(8, 8, 3, 2, 0)):
        x = torch.randn(1, 8, 9, 6, 6)
        y = torch.randn_like(x)
        y[:, :, :5] = x[:, :, :5]  # frames 5.. change
        with torch.no_grad():
            out_x, out_y = conv(x), conv(y)
        last_clean = 5 if conv.stride[0] == 1 else 3  # stride 2: output j reads frames 2j-2 .. 2j
        assert_close(out_x[:, :, :last_clean], out_y[:, :, :last_clean], rtol=0, atol=0)
        assert not torch.allclose(out_x[:, :, last_clean], out_y[:, :, last_clean])


def test_decode_causality_is_per_window(vae):
    z = _latents(9)
    first_window = _decode(vae, z[:, :, :5])
    later = z.clone()
    later[:, :, 5:] += 1.0  # latents only in the second window
    assert_close(_decode(vae, later)[:, :, :17], first_window, rtol=0, atol=0)
    # Inside a window the model is not causal: GroupNorm statistics span all frames of the window.
    inside = z[:, :, :5].clone()
    inside[:, :, 3] += 1.0
    assert not torch.allclose(_decode(vae, inside)[:, :, 0], first_window[:, :, 0], atol=1e-4)


@torch.no_grad()
def test_encode_image_posterior(vae):
    x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(2)) * 2 - 1
    post = vae.encode(x).latent_dist
    assert post.parameters.shape == (1, 8, 8, 12)
    assert post.mean.shape == post.std.shape == (1, 4, 8, 12)
    assert_close(post.mean, post.parameters[:, :4])
    assert_close(post.std, torch.exp(0.5 * post.parameters[:, 4:].clamp(-30, 20)))
    a = post.sample(torch.Generator().manual_seed(7))
    assert_close(a, post.sample(torch.Generator().manual_seed(7)), rtol=0, atol=0)
    assert not torch.allclose(a, post.sample(torch.Generator().manual_seed(8)))
    # One fp32 draw of the mean's shape: sample = mean + std * noise.
    noise = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(7))
    assert_close(a, post.mean + post.std * noise)
    video = vae.encode(x.unsqueeze(2)).latent_dist  # an image is a 1-frame video
    assert_close(video.parameters[:, :, 0], post.parameters)


@torch.no_grad()
def test_encode_video_lengths_and_tiling(vae):
    x = torch.randn(1, 3, 33, 16, 16, generator=torch.Generator().manual_seed(3))
    assert vae.encode(x[:, :, :17]).latent_dist.mean.shape == (1, 4, 5, 2, 2)
    assert vae.encode(x[:, :, :5]).latent_dist.mean.shape == (1, 4, 2, 2, 2)
    # 33 frames: windows [0:17] and [16:33], the second drops its first latent.
    tiled = vae.encode(x).latent_dist.parameters
    assert tiled.shape == (1, 8, 9, 2, 2)
    assert_close(tiled[:, :, :5], vae.encode(x[:, :, :17]).latent_dist.parameters)
    assert_close(tiled[:, :, 5:], vae.encode(x[:, :, 16:33]).latent_dist.parameters[:, :, 1:])


def test_scale_and_unscale_in_place():
    with torch.device("meta"):
        plain = AutoencoderKLOpenSora(**TINY_VAE_CONFIG)
        shifted = AutoencoderKLOpenSora(**{**TINY_VAE_CONFIG, "shift_factor": 0.5})
    x = torch.randn(2, 4, 3, 4, 4)
    y = x.clone()
    assert plain.scale_(y) is y
    assert_close(y, x * 0.18215)
    assert plain.unscale_(y) is y
    assert_close(y, x)
    y = x.clone()
    assert_close(shifted.scale_(y), (x - 0.5) * 0.18215)
    assert_close(shifted.unscale_(y), x)


def test_safetensors_from_pretrained_round_trip(vae, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_VAE_CONFIG))  # the official folder layout
    state = {k: v.contiguous() for k, v in vae.state_dict().items()}
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    loaded = AutoencoderKLOpenSora.from_pretrained(str(tmp_path)).eval()
    assert loaded.state_dict().keys() == state.keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key
    AutoencoderKLOpenSora(**TINY_VAE_CONFIG).load_state_dict(state, strict=True)  # no key mapping needed
    assert loaded.config.block_out_channels == TINY_VAE_CONFIG["block_out_channels"]
    z = _latents(5)
    assert_close(_decode(loaded, z), _decode(vae, z), rtol=0, atol=0)
