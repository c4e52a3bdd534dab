"""Open-Sora-Plan causal video VAE as NOVA's osp480 checkpoint uses it (`AutoencoderKLOpenSora`).

Our own implementation of the behaviour of diffnext's class of the same name (NOVA HEAD 2cd254a): the
same config arguments, the same parameter names and shapes (the official
`vae/diffusion_pytorch_model.safetensors` loads with `strict=True`, no key mapping) and the same math.

    encoder: 2-D conv_in -> down blocks (2-D blocks run frame by frame with the frames folded into the
             batch; the first 3-D block or downsampler unfolds them into a time axis) -> mid block
             (ResBlock, per-frame single-head attention, ResBlock) -> GroupNorm -> SiLU -> conv_out
    decoder: conv_in -> mid block -> up blocks (x2 time+space, x2 time+space, x2 space, none) -> out

Compression is 8x in space and 4x in time, causal-style: T latents <-> 1 + 4 (T - 1) frames.
The model is NOT strictly causal inside a window: GroupNorm statistics span every frame of the window,
and the temporal trilinear upsampling reads one latent ahead. Only temporal tiles are independent.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from torch import Tensor, nn

__all__ = ["AutoencoderKLOpenSora", "DiagonalGaussianDistribution", "OSP480_VAE_CONFIG", "TINY_VAE_CONFIG"]

# The official class hard-wires these; `norm_num_groups` is registered in the config but not used.
NORM_GROUPS, NORM_EPS = 32, 1e-6

# Released vae/config.json of BAAI/nova-d48w1024-osp480 (values: NOVA_SPEC 1.3). The block-type strings
# are not verified verbatim, but only "Block2D" in a name matters (any other name selects a causal 3-D
# block), so they cannot change the model.
OSP480_VAE_CONFIG: dict = {
    "_class_name": "AutoencoderKLOpenSora", "in_channels": 3, "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock3D", "DownEncoderBlock3D"],
    "up_block_types": ["UpDecoderBlock3D"] * 4, "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2, "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 32, "sample_size": 480,
    "scaling_factor": 0.18215, "shift_factor": None, "latents_mean": None, "latents_std": None,
    "force_upcast": True, "use_quant_conv": True, "use_post_quant_conv": True,
}
# Same structure (2-D/3-D split, temporal up/down sampling, mid attention, tiling), tiny widths.
TINY_VAE_CONFIG: dict = {**OSP480_VAE_CONFIG, "block_out_channels": [32, 32, 64, 64], "layers_per_block": 1,
                         "sample_size": 64}


def _is_3d(block_type: str) -> bool:
    return "Block2D" not in block_type  # the official dispatch rule


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(NORM_GROUPS, channels, eps=NORM_EPS)


class CausalConv3d(nn.Conv3d):
    """Conv3d that pads time only in front, by repeating the first frame k_t - 1 times (space: zeros)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size, stride=1, padding=0) -> None:
        super().__init__(in_ch, out_ch, kernel_size, stride, padding)
        self.padding = (0,) + tuple(self.padding[1:])  # time is padded in forward instead
        self.time_pad = self.kernel_size[0] - 1

    def forward(self, x: Tensor) -> Tensor:
        if self.time_pad:  # a replicate pad (not a cat) keeps the input's memory layout, hence the
            # same conv kernels and bit-identical fp32 results as upstream's ReplicationPad3d
            x = F.pad(x, (0, 0, 0, 0, self.time_pad, 0), mode="replicate")
        return super().forward(x)


def _conv(is_3d: bool, in_ch: int, out_ch: int, kernel_size=3, stride=1, padding=1) -> nn.Module:
    return (CausalConv3d if is_3d else nn.Conv2d)(in_ch, out_ch, kernel_size, stride, padding)


def _fold_frames(x: Tensor, num_frames: int) -> Tensor:
    """[B*T, C, H, W] (frames in the batch, as the 2-D stages run) -> [B, C, T, H, W]."""
    return x.unflatten(0, (-1, num_frames)).transpose(1, 2) if x.dim() == 4 else x


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, is_3d: bool) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(in_ch), _conv(is_3d, in_ch, out_ch)
        self.norm2, self.conv2 = _norm(out_ch), _conv(is_3d, out_ch, out_ch)
        self.conv_shortcut = _conv(is_3d, in_ch, out_ch, 1, 1, 0) if in_ch != out_ch else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))


class FrameAttention(nn.Module):
    """Single-head self-attention among the pixels of each frame (no residual: the mid block adds it)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.group_norm = _norm(dim)  # on 5-D input its statistics span all frames
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x: Tensor) -> Tensor:
        h = self.group_norm(x)
        h = h.unsqueeze(2) if h.dim() == 4 else h
        b, c, t, height, width = h.shape
        # One sequence per frame. Contiguous tokens: Linear kernels (so bf16/fp16 bits) depend on layout.
        tokens = h.permute(0, 2, 3, 4, 1).reshape(b * t, height * width, c).contiguous()
        q, k, v = (f(tokens).unsqueeze(1) for f in (self.to_q, self.to_k, self.to_v))  # one head
        o = self.to_out[0](F.scaled_dot_product_attention(q, k, v).squeeze(1))
        o = o.view(b, t, height, width, c).permute(0, 4, 1, 2, 3)
        return o.reshape(x.shape)


class MidBlock(nn.Module):
    def __init__(self, dim: int, is_3d: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(dim, dim, is_3d), ResnetBlock(dim, dim, is_3d)])
        self.attentions = nn.ModuleList([FrameAttention(dim)])

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        return self.resnets[1](self.attentions[0](x) + x)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one pixel right and bottom; 3-D: also /2 in time (causal)."""

    def __init__(self, dim: int, is_3d: bool) -> None:
        super().__init__()
        self.conv = _conv(is_3d, dim, dim, 3, 2, 0)

    def forward(self, x: Tensor, num_frames: int) -> Tensor:
        x = _fold_frames(x, num_frames) if isinstance(self.conv, CausalConv3d) else x
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # T frames -> (T - 1) // 2 + 1


class Upsample(nn.Module):
    """x2 upsampling then a conv. Temporal: trilinear x2 in time and space, except frame 0 which is
    only doubled in space (T -> 2T - 1); spatial: nearest x2 and a (1,3,3) conv for 3-D blocks."""

    def __init__(self, dim: int, is_3d: bool, temporal: bool) -> None:
        super().__init__()
        self.temporal = temporal and is_3d
        self.conv = _conv(is_3d, dim, dim, 3 if self.temporal or not is_3d else (1, 3, 3), 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        if not self.temporal:
            return self.conv(x.repeat_interleave(2, -2).repeat_interleave(2, -1))
        frames = [F.interpolate(x[:, :, :1], scale_factor=(1, 2, 2), mode="trilinear")]
        if x.size(2) > 1:
            frames.append(F.interpolate(x[:, :, 1:], scale_factor=(2, 2, 2), mode="trilinear"))
        return self.conv(torch.cat(frames, dim=2))


class DownBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, is_3d: bool, depth: int, down_3d: Optional[bool]) -> None:
        super().__init__()
        self.is_3d = is_3d
        self.resnets = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch, is_3d) for i in range(depth))
        self.downsamplers = nn.ModuleList([] if down_3d is None else [Downsample(out_ch, down_3d)])

    def forward(self, x: Tensor, num_frames: int) -> Tensor:
        x = _fold_frames(x, num_frames) if self.is_3d else x
        for module in self.resnets:
            x = module(x)
        return self.downsamplers[0](x, num_frames) if len(self.downsamplers) else x


class UpBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, is_3d: bool, depth: int, up: Optional[str]) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch, is_3d) for i in range(depth))
        self.upsamplers = nn.ModuleList([] if up is None else [Upsample(out_ch, is_3d, up == "time")])

    def forward(self, x: Tensor) -> Tensor:
        for module in list(self.resnets) + list(self.upsamplers):
            x = module(x)
        return x


class Encoder(nn.Module):
    def __init__(self, in_ch: int, latent_ch: int, block_types: Sequence[str], channels: Sequence[int],
                 depth: int) -> None:
        super().__init__()
        is_3d, n = [_is_3d(t) for t in block_types], len(channels)
        self.conv_in = nn.Conv2d(in_ch, channels[0], 3, 1, 1)  # always 2-D: frames travel in the batch
        self.down_blocks = nn.ModuleList(
            DownBlock(channels[max(i - 1, 0)], channels[i], is_3d[i], depth, is_3d[i + 1] if i < n - 1 else None)
            for i in range(n))
        self.mid_block = MidBlock(channels[-1], is_3d[-1])
        self.conv_norm_out = _norm(channels[-1])
        self.conv_out = _conv(is_3d[-1], channels[-1], 2 * latent_ch)

    def forward(self, x: Tensor) -> Tensor:
        num_frames = x.size(2) if x.dim() == 5 else 1
        x = self.conv_in(x.transpose(1, 2).flatten(0, 1) if x.dim() == 5 else x)
        for block in self.down_blocks:
            x = block(x, num_frames)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, latent_ch: int, out_ch: int, block_types: Sequence[str], channels: Sequence[int],
                 depth: int) -> None:
        super().__init__()
        channels, is_3d, n = list(reversed(channels)), [_is_3d(t) for t in block_types], len(channels)
        self.conv_in = _conv(is_3d[-1], latent_ch, channels[0])
        self.mid_block = MidBlock(channels[0], is_3d[-1])
        # Every block but the last upsamples; all but the last two also upsample time.
        ups = ["time" if i < n - 2 else "space" for i in range(n - 1)] + [None]
        self.up_blocks = nn.ModuleList(
            UpBlock(channels[max(i - 1, 0)], channels[i], is_3d[i], depth + 1, ups[i]) for i in range(n))
        self.conv_norm_out = _norm(channels[-1])
        self.conv_out = _conv(is_3d[-1], channels[-1], out_ch)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class DiagonalGaussianDistribution:
    """Posterior N(mean, std^2) from encoder moments [mean | logvar] on dim 1. Statistics are fp32;
    samples come back in the moments' dtype."""

    def __init__(self, moments: Tensor) -> None:
        self.parameters, self.device, self.dtype = moments, moments.device, moments.dtype
        self.mean, logvar = moments.float().chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std, self.var = torch.exp(0.5 * self.logvar), torch.exp(self.logvar)

    def sample(self, generator: Optional[torch.Generator] = None) -> Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return (noise * self.std + self.mean).to(device=self.device, dtype=self.dtype)


def _tiled(fn: Callable[[Tensor], Tensor], x: Tensor, window: int, in_overlap: int, out_overlap: int) -> Tensor:
    """Run `fn` on time windows of `window` steps that overlap by `in_overlap`; later windows drop their
    first `out_overlap` outputs. Only windows that fit are run, so trailing steps that do not fill a
    window are dropped (official behaviour: 6..8 latents decode like 5)."""
    if x.dim() == 4 or x.size(2) <= window:
        return fn(x)
    starts = range(0, x.size(2) - window + 1, window - in_overlap)
    tiles = [fn(x[:, :, s : s + window]) for s in starts]
    return torch.cat([tiles[0]] + [tile[:, :, out_overlap:] for tile in tiles[1:]], dim=2)


class AutoencoderKLOpenSora(ModelMixin, ConfigMixin):
    """Causal video VAE. encode: [B,3,T,H,W] -> posterior over [B,4,T',H/8,W/8]; decode is the inverse
    map with temporal tiling. 4-D inputs are single images and give 4-D outputs."""

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: Sequence[str] = ("DownEncoderBlock2D",) * 4,
        up_block_types: Sequence[str] = ("UpDecoderBlock2D",) * 4,
        block_out_channels: Sequence[int] = (128, 256, 512, 512),
        layers_per_block: int = 2,
        act_fn: str = "silu",  # registered only, like upstream (SiLU is fixed)
        latent_channels: int = 16,
        norm_num_groups: int = 32,  # registered only (32 groups are fixed)
        sample_size: int = 256,
        scaling_factor: float = 0.18215,
        shift_factor: Optional[float] = None,
        latents_mean=None,
        latents_std=None,
        force_upcast: bool = True,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
    ) -> None:
        super().__init__()
        # Temporal tiling: windows of 17 frames / 5 latents that share one frame / one latent.
        self.sample_min_t, self.latent_min_t, self.sample_ovr_t, self.latent_ovr_t = 17, 5, 1, 1
        channels, depth = block_out_channels, layers_per_block
        self.encoder = Encoder(in_channels, latent_channels, down_block_types, channels, depth)
        self.decoder = Decoder(latent_channels, out_channels, up_block_types, channels, depth)
        self.video_latents = _is_3d(up_block_types[-1])  # latents are [B, C, T, h, w]
        moments = 2 * latent_channels
        self.quant_conv = (_conv(self.video_latents, moments, moments, 1, 1, 0)
                           if use_quant_conv else nn.Identity())
        self.post_quant_conv = (_conv(self.video_latents, latent_channels, latent_channels, 1, 1, 0)
                                if use_post_quant_conv else nn.Identity())

    def scale_(self, x: Tensor) -> Tensor:
        """In place: x = (x - shift_factor) * scaling_factor."""
        if self.config.shift_factor:
            x.add_(-self.config.shift_factor)
        return x.mul_(self.config.scaling_factor)

    def unscale_(self, x: Tensor) -> Tensor:
        """In place: x = x * (1 / scaling_factor) + shift_factor."""
        x.mul_(1 / self.config.scaling_factor)
        return x.add_(self.config.shift_factor) if self.config.shift_factor else x

    def encode(self, x: Tensor) -> AutoencoderKLOutput:
        """[B,3,T,H,W] video (or [B,3,H,W] image) in [-1, 1] -> posterior over the latents."""
        image = x.dim() == 4 and self.video_latents
        z = _tiled(self.encoder, x, self.sample_min_t, self.sample_ovr_t, self.latent_ovr_t)
        z = self.quant_conv(z)
        return AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution(z.squeeze(2) if image else z))

    def decode(self, z: Tensor) -> DecoderOutput:
        """Unscaled latents [B,4,T,h,w] -> [B,3,1+4(T-1),8h,8w] (tiled when T > 5); [B,4,h,w] -> image."""
        image = z.dim() == 4 and self.video_latents
        z = self.post_quant_conv(z.unsqueeze(2) if image else z)
        x = _tiled(self.decoder, z, self.latent_min_t, self.latent_ovr_t, self.sample_ovr_t)
        return DecoderOutput(sample=x.squeeze(2) if image else x)

    def forward(self, x: Tensor) -> Tensor:
        return x  # a no-op upstream too; call encode / decode

