"""The NOVA transformer (`transformer/` folder of a checkpoint), with the official parameter names.

Submodules, as in the checkpoint:
  text_embed       null text features + projection of Phi-2 features
  motion_embed     flow / fps scalar tokens (video checkpoints only)
  video_pos_embed  temporal position embedding (depends on the requested latent length)
  mask_embed       BOS and mask tokens
  video_encoder    temporal transformer (causal across frames through its KV cache), + `mixer`
  image_encoder    spatial transformer, MAE-style: known tokens first, then all tokens
  image_decoder    diffusion MLP head, one token at a time

Everything here is a pure function of its inputs: randomness, schedules and loops live in the
pipeline and the runtime, so the same modules serve as reference, export source and torch backend.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from runtime.model.config import NOVAConfig
from runtime.model.kv_cache import KVCache


def sincos_1d(values: torch.Tensor, dim: int = 256, sin_first: bool = True) -> torch.Tensor:
    """Scalar -> [sin(v f), cos(v f)] (or cos first) with f_i = 10000^(-i/(dim/2)), in fp32."""
    half = dim // 2
    freq = 1 / (10000 ** (torch.arange(half, dtype=torch.float32, device=values.device) / half))
    angle = values.float().reshape(-1, 1) * freq.unsqueeze(0)
    parts = (angle.sin(), angle.cos()) if sin_first else (angle.cos(), angle.sin())
    return torch.cat(parts, dim=-1)


def space_sincos(height: int, width: int, dim: int) -> torch.Tensor:
    """2-D sin-cos table [h*w, dim], row-major tokens, x part first: [sin x, cos x, sin y, cos y]."""
    quarter, cpu = dim // 4, torch.device("cpu")  # a constant, also when the model is built on meta
    freq = 1 / (10000 ** (torch.arange(quarter, dtype=torch.float32, device=cpu) / quarter))
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32, device=cpu),
                            torch.arange(width, dtype=torch.float32, device=cpu), indexing="ij")
    fx = xs.reshape(-1, 1) * freq
    fy = ys.reshape(-1, 1) * freq
    return torch.cat([fx.sin(), fx.cos(), fy.sin(), fy.cos()], dim=-1)


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)*(W/p), p*p*C], token values ordered (py, px, c)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(x: torch.Tensor, patch: int, height: int, width: int) -> torch.Tensor:
    """Inverse of `patchify` for a [B, tokens, p*p*C] tensor and a latent of height x width."""
    b, _, d = x.shape
    c = d // (patch * patch)
    x = x.reshape(b, height // patch, width // patch, patch, patch, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, height, width)


class PatchEmbed(nn.Module):
    """Conv2d(kernel = stride = patch) from latents to tokens."""

    def __init__(self, in_dim: int, dim: int, patch: int):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_dim, dim, patch, patch)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.proj(latents).flatten(2).transpose(1, 2)

    def embed_patches(self, tokens: torch.Tensor) -> torch.Tensor:
        """The same map applied to already patchified values [..., p*p*C] (a Linear)."""
        weight = self.proj.weight.permute(0, 2, 3, 1).reshape(self.proj.out_channels, -1)
        return F.linear(tokens, weight, self.proj.bias)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`kv_cache`: any object whose `update(layer, k, v)` returns the keys/values to attend to;
        `attn_mask`: boolean, True = may attend (the official inference path uses none)."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Post-norm transformer block: x + LN(attn(x)), then x + LN(mlp(x))."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm1(self.attn(x, kv_cache, layer, attn_mask)) + x
        return self.norm2(self.mlp(x)) + x


class ScaleShiftMixer(nn.Module):
    """The video "scale and shift" layer: anchor * (1 + scale) + shift, stats from a low-rank map of c_t."""

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.lora = nn.Linear(dim, rank, bias=False)
        self.proj = nn.Linear(rank, 2 * dim)

    def forward(self, anchor: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        scale, shift = self.proj(self.lora(F.silu(current))).chunk(2, dim=-1)
        return anchor * (1 + scale) + shift


class VisionTransformer(nn.Module):
    """Shared body of the temporal (video) and spatial (image) encoders."""

    def __init__(self, depth: int, dim: int, num_heads: int, patch: int, image_dim: int):
        super().__init__()
        self.patch_embed = PatchEmbed(image_dim, dim, patch)
        self.blocks = nn.ModuleList(Block(dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.encoder_depth = depth // 2  # spatial encoder: known tokens only in the first half

    def forward(self, x: torch.Tensor, prefix: torch.Tensor | None = None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        """Run all blocks on [prefix, x]; return the normalized x part (temporal encoder)."""
        h = x if prefix is None else torch.cat([prefix, x], dim=1)
        for i, block in enumerate(self.blocks):
            h = block(h, kv_cache, i)
        if kv_cache is not None:
            kv_cache.advance(h.shape[1])
        return self.norm(h[:, h.shape[1] - x.shape[1]:])

    def forward_masked(self, tokens: torch.Tensor, condition: torch.Tensor,
                       known_ids: torch.Tensor) -> torch.Tensor:
        """Spatial encoder. tokens [M, N, D] (mask token at unknown positions, positions added),
        condition [M, Nv, D] (the indicator), known_ids [M, k] (k may be 0).

        Blocks [0, depth/2) see only the condition and the k known tokens; their outputs are
        scattered back and blocks [depth/2, depth) see the condition and all N tokens.
        """
        index = known_ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
        h = torch.cat([condition, tokens.gather(1, index)], dim=1)
        for block in self.blocks[: self.encoder_depth]:
            h = block(h)
        condition, known = h.split([condition.shape[1], known_ids.shape[1]], dim=1)
        h = torch.cat([condition, tokens.scatter(1, index, known)], dim=1)
        for block in self.blocks[self.encoder_depth:]:
            h = block(h)
        return self.norm(h[:, condition.shape[1]:])


class TextEmbed(nn.Module):
    """Projects Phi-2 features; `weight` holds the learned null feature of every text position."""

    def __init__(self, token_dim: int, dim: int, num_tokens: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.register_buffer("weight", torch.zeros(512, token_dim))
        self.proj = nn.Linear(token_dim, dim)
        self.norm = nn.LayerNorm(dim)

    def fill_null(self, features: list[torch.Tensor | None]) -> torch.Tensor:
        """Per prompt, its [Lp, token_dim] features (None or Lp = 0: empty prompt) over the null rows."""
        out = self.weight[: self.num_tokens].expand(len(features), -1, -1).clone()
        for i, feature in enumerate(features):
            if feature is not None and feature.shape[0]:
                out[i, : feature.shape[0]] = feature[: self.num_tokens].to(out)
        return out

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(features))


class Projector(nn.Module):
    """Linear -> SiLU -> Linear."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)))


def scalar_projector(dim: int) -> nn.Sequential:
    """Linear(256, D) -> SiLU -> Linear(D, D), keys `0.*` and `2.*` as in the checkpoint."""
    return nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))


class MotionEmbed(nn.Module):
    """Two condition tokens per sample: motion flow and frames per second."""

    BASE_FLOW, BASE_FPS = 5.0, 12.0  # official defaults; the pipeline never passes fps

    def __init__(self, dim: int):
        super().__init__()
        self.flow_proj = scalar_projector(dim)
        self.fps_proj = scalar_projector(dim)

    def forward(self, flow: torch.Tensor, fps: torch.Tensor) -> torch.Tensor:
        dtype = self.flow_proj[0].weight.dtype
        tokens = [proj(sincos_1d(v).to(dtype)) for proj, v in ((self.flow_proj, flow), (self.fps_proj, fps))]
        return torch.stack(tokens, dim=1)


class VideoPosEmbed(nn.Module):
    """Temporal position of frame k of T at k * base_t / T, projected and normalized."""

    def __init__(self, dim: int, base_t: int):
        super().__init__()
        self.base_t = base_t
        self.time_proj = scalar_projector(dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, num_frames: int) -> torch.Tensor:
        """[T, 1, D] time embedding for a request of T latent frames."""
        device, dtype = self.norm.weight.device, self.time_proj[0].weight.dtype
        positions = torch.arange(num_frames, dtype=torch.float32, device=device) / (num_frames / self.base_t)
        return self.norm(self.time_proj(sincos_1d(positions).to(dtype))).unsqueeze(1)


class MaskEmbed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.bos_token = nn.Parameter(torch.zeros(1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))

    def apply_mask(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Replace tokens where mask [M, N, 1] is 1 by the mask token."""
        return tokens * (1 - mask) + self.mask_token * mask


def step_chunks(t: torch.Tensor, steps: int) -> tuple[torch.Tensor, ...]:
    """t's rows cut into `steps` equal parts, one per diffusion step (one Split node; none for one step, where
    a one-output Split would be a launch for nothing)."""
    return t.chunk(steps) if steps > 1 else (t,)


class AdaNorm(nn.Module):
    """Non-affine LayerNorm modulated by (scale, shift[, gate]) computed from the condition. The modulation
    depends on the condition only, so its two halves are separate: `stats` for any number of diffusion steps
    at once, `modulate` applying one step's."""

    def __init__(self, dim: int, num_stats: int):
        super().__init__()
        self.num_stats = num_stats
        self.proj = nn.Linear(dim, num_stats * dim)

    def stats(self, silu_cond: torch.Tensor, steps: int) -> list[tuple[torch.Tensor, ...]]:
        """silu(cond) [S * R, D], step-major rows -> per step, (1 + scale, shift[, gate]) [R, D] each: one
        matrix product for all S steps, each statistic cut into its S steps by one split."""
        scale, shift, *gate = self.proj(silu_cond).chunk(self.num_stats, dim=-1)
        # 1 + scale is the addition LN(x) * (1 + scale) makes, on the same operands: done once for every step.
        return list(zip(*(step_chunks(stat, steps) for stat in (1 + scale, shift, *gate))))

    def modulate(self, x: torch.Tensor, one_plus_scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """LN(x) * (1 + scale) + shift, the official order."""
        # the normalized shape from the module, not x.shape: the TorchScript exporter needs it constant
        return F.layer_norm(x, (self.proj.in_features,), eps=1e-6) * one_plus_scale + shift


class DiffusionBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm1 = AdaNorm(dim, num_stats=3)
        self.proj = Projector(dim, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, stats: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """x [R, D] given norm1's (1 + scale, shift, gate) of this step (`AdaNorm.stats`)."""
        one_plus_scale, shift, gate = stats
        h = self.norm1.modulate(x, one_plus_scale, shift)
        return self.norm2(self.proj(h)) * gate + x


class TimeCondEmbed(nn.Module):
    def __init__(self, cond_dim: int, dim: int):
        super().__init__()
        self.timestep_proj = Projector(256, dim)
        self.condition_proj = Projector(cond_dim, dim)

    def forward(self, timestep: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The official condition: condition_proj(z) [M, n, D] plus the embedding of each row's timestep [M]."""
        return self.condition_proj(z) + self.timestep_embedding(timestep, z.dtype).unsqueeze(1)

    def timestep_embedding(self, timesteps: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """timesteps [T] -> timestep_proj of their frequency embedding [T, D], computing in `dtype`."""
        # cos first, f_i = exp(-ln(1e4) i / 128): differs from the sin-first tables above.
        freq = torch.exp(torch.arange(128, dtype=torch.float32, device=timesteps.device) * (-math.log(10000) / 128))
        angle = timesteps.float().unsqueeze(-1) * freq
        return self.timestep_proj(torch.cat([angle.cos(), angle.sin()], dim=-1).to(dtype))


Modulations = list[tuple[torch.Tensor, ...]]  # one diffusion step's AdaNorm stats: the blocks' norm1, then norm


class DiffusionMLP(nn.Module):
    """Predicts the velocity (flow matching) or noise (DDPM) of each token being generated.

    Two halves: `modulations`, everything that depends on the condition and the timestep only (the timestep
    embedding, cond = condition_proj(z) + it, and every AdaNorm's proj(silu(cond))), computed for all of a
    diffusion loop's steps at once; and `network`, one step on the noisy tokens given its modulations. Rows
    are 2-D [R, D] (R = M * n) throughout, so every Linear is one matrix product with its bias."""

    def __init__(self, depth: int, dim: int, cond_dim: int, patch: int, image_dim: int):
        super().__init__()
        self.patch_embed = PatchEmbed(image_dim, dim, patch)
        self.time_cond_embed = TimeCondEmbed(cond_dim, dim)
        self.blocks = nn.ModuleList(DiffusionBlock(dim) for _ in range(depth))
        self.norm = AdaNorm(dim, num_stats=2)
        self.head = nn.Linear(dim, patch * patch * image_dim)

    def forward(self, noisy: torch.Tensor, timestep: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The official head: noisy [M, n, p*p*C] patchified values, timestep [M] (each row's, embedded per
        row as the official code does), z [M, n, D] -> [M, n, p*p*C]."""
        m, n, _ = noisy.shape
        cond = self.time_cond_embed(timestep, z).reshape(m * n, -1)
        (stats,) = self._stats(F.silu(cond), 1)
        return self.network(noisy.reshape(m * n, -1), stats).reshape(m, n, -1)

    def modulations(self, condition: torch.Tensor, timesteps: torch.Tensor) -> list[Modulations]:
        """The step-independent work of S diffusion steps: condition [R, D] (condition_proj of z's R rows),
        timesteps [S] -> per step, its `Modulations` [R, D] each. The timestep embedding is computed once per
        step for all rows (they share the step's timestep), each AdaNorm's projection once over [S * R, D]."""
        temb = self.time_cond_embed.timestep_embedding(timesteps, condition.dtype)  # [S, D]
        cond = condition + temb.unsqueeze(1)  # [S, R, D]: the official condition_proj(z) + temb
        return self._stats(F.silu(cond.flatten(0, 1)), timesteps.shape[0])

    def network(self, noisy: torch.Tensor, stats: Modulations) -> torch.Tensor:
        """One diffusion step: noisy [R, p*p*C] given the step's modulations -> the prediction [R, p*p*C]."""
        x = self.patch_embed.embed_patches(noisy)
        for block, block_stats in zip(self.blocks, stats):
            x = block(x, block_stats)
        return self.head(self.norm.modulate(x, *stats[-1]))

    def _stats(self, silu_cond: torch.Tensor, steps: int) -> list[Modulations]:
        per_norm = [norm.stats(silu_cond, steps) for norm in (*(block.norm1 for block in self.blocks), self.norm)]
        return [list(step) for step in zip(*per_norm)]


class NOVATransformer3DModel(nn.Module):
    def __init__(self, config: NOVAConfig):
        super().__init__()
        self.config = config
        dim, heads, p = config.width, config.num_heads, config.patch_size
        self.video_encoder = VisionTransformer(config.video_depth, dim, heads, config.video_patch, config.image_dim)
        if config.video_mixer_rank:
            self.video_encoder.mixer = ScaleShiftMixer(dim, config.video_mixer_rank)
        self.image_encoder = VisionTransformer(config.image_depth, dim, heads, p, config.image_dim)
        self.image_decoder = DiffusionMLP(config.mlp_depth, config.mlp_width, dim, p, config.image_dim)
        self.mask_embed = MaskEmbed(dim)
        self.text_embed = TextEmbed(config.text_token_dim, dim, config.text_token_len)
        self.video_pos_embed = VideoPosEmbed(dim, config.video_base_size[0])
        if config.has_motion:
            self.motion_embed = MotionEmbed(dim)
        # Constant sin-cos tables (not in the checkpoint).
        self.register_buffer("video_space_embed", space_sincos(*config.video_base_size[1:], dim), persistent=False)
        self.register_buffer("image_space_embed", space_sincos(*config.image_base_size, dim), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.mask_embed.bos_token.dtype

    # -- condition ------------------------------------------------------------------------------
    def condition(self, text_features: torch.Tensor, motion_flow: torch.Tensor | None = None) -> torch.Tensor:
        """[n, L, text_dim] null-filled text features (+ [n] flow) -> condition prefix [n, L(+2), D]."""
        cond = self.text_embed(text_features.to(self.dtype))
        if self.config.has_motion:
            if motion_flow is None:
                raise ValueError("this video checkpoint needs motion_flow")
            fps = torch.full_like(motion_flow, MotionEmbed.BASE_FPS, dtype=torch.float32)
            cond = torch.cat([cond, self.motion_embed(motion_flow, fps)], dim=1)
        return cond

    # -- temporal ---------------------------------------------------------------------------------
    def frame_tokens(self, prev_latent: torch.Tensor | None, time_embed: torch.Tensor, batch: int) -> torch.Tensor:
        """Temporal-encoder input of one frame: BOS (first frame) or the previous latent frame,
        plus its time embedding [1, D] and the space sin-cos. -> [batch, Nv, D]."""
        if prev_latent is None:
            tokens = self.mask_embed.bos_token.expand(batch, self.config.num_video_tokens, -1)
        else:
            tokens = self.video_encoder.patch_embed(prev_latent)
        return tokens + time_embed + self.video_space_embed.to(tokens.dtype)

    def temporal(self, frame_tokens: torch.Tensor, prefix: torch.Tensor | None,
                 kv_cache: KVCache | None) -> torch.Tensor:
        """One frame of the temporal encoder -> c_t [M, Nv, D]. The prefix (condition) goes with frame 0."""
        return self.video_encoder(frame_tokens, prefix, kv_cache)

    def indicator(self, anchor: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        """Spatial condition of frame t >= 1: mixer(anchor = c_0, c_t), or c_t without a mixer."""
        mixer = getattr(self.video_encoder, "mixer", None)
        return current if mixer is None else mixer(anchor, current)

    # -- spatial ----------------------------------------------------------------------------------
    def spatial(self, canvas: torch.Tensor, mask: torch.Tensor, indicator: torch.Tensor,
                known_ids: torch.Tensor) -> torch.Tensor:
        """canvas [B, C, h, w], mask [B, N, 1] (1 = unknown), indicator [M, Nv, D], known_ids [M, k]
        -> per-token conditions Z [M, N, D]. M = 2B under CFG: both halves see the same canvas,
        duplicated after the patch embedding as the official code does (same rounding)."""
        tokens = self.mask_embed.apply_mask(self.image_encoder.patch_embed(canvas), mask)
        if indicator.shape[0] != tokens.shape[0]:
            tokens = torch.cat([tokens] * (indicator.shape[0] // tokens.shape[0]))
        tokens = tokens + self.image_space_embed.to(tokens.dtype)
        return self.image_encoder.forward_masked(tokens, indicator, known_ids)

    # -- diffusion head -----------------------------------------------------------------------------
    def denoise_head(self, noisy: torch.Tensor, timestep: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.image_decoder(noisy, timestep, z)
