"""The graphs as torch modules: thin wrappers over the NOVA modules (no copy of model code).

Each wrapper computes exactly one graph of `runtime.graphs.specs`: its forward takes the graph's
inputs (by the same names, dtypes and shapes) and returns its outputs. They are what the exporter
traces and what the runner's torch backend calls, so both run the same code. The wrappers only add
what a static-shape graph needs around the official modules:

- classifier-free guidance duplication inside the graph (M = 2B rows) where the reference does it;
- the temporal KV cache as explicit fixed-size tensors with a write position and a validity mask;
- the spatial encoder's variable known-token half as bucketed slots under an exact key mask;
- the sampler update (a `SamplerTable` row) and CFG mixing in fp32;
- the precision policy: in fp16/bf16 graphs LayerNorm/GroupNorm run in fp32 (`fp32_islands`).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from runtime.graphs.profile import Geometry
from runtime.model import vae as vae_ops
from runtime.model.transformer import NOVATransformer3DModel, patchify, sincos_1d, unpatchify

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NORM_MODULES = (nn.LayerNorm, nn.GroupNorm)


# -------------------------------------------------------------------------------------------------
# Precision
# -------------------------------------------------------------------------------------------------
class _Fp32Norms(TorchFunctionMode):
    """Runs F.layer_norm / F.group_norm on 16-bit inputs in fp32 and casts the result back.

    NOVA's blocks are post-norm (x + LN(sublayer(x))): the LayerNorm input is an unnormalized
    sublayer output whose variance overflows in fp16. In the exported graph this is
    Cast(fp32) -> LayerNormalization/GroupNorm (fp32) -> Cast(fp16), which a strongly typed
    TensorRT network executes as written.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.layer_norm, F.group_norm) and args and args[0].dtype in (torch.float16, torch.bfloat16):
            dtype = args[0].dtype
            up = lambda v: v.float() if torch.is_tensor(v) and v.is_floating_point() else v  # noqa: E731
            return func(*(up(a) for a in args), **{k: up(v) for k, v in kwargs.items()}).to(dtype)
        return func(*args, **kwargs)


def fp32_islands(dtype: torch.dtype):
    """Context for a graph computing in `dtype`: fp32 norms when dtype is 16-bit, else nothing."""
    return _Fp32Norms() if dtype in (torch.float16, torch.bfloat16) else contextlib.nullcontext()


def cast_module(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast a module's weights to `dtype` for matrix work, keeping norm parameters in fp32."""
    nn.Module.to(module, dtype)  # (diffusers' ModelMixin.to warns about fp32 modules it does not have)
    if dtype != torch.float32:
        for sub in module.modules():
            if isinstance(sub, NORM_MODULES):
                sub.float()
    return module.eval().requires_grad_(False)


class GraphModule(nn.Module):
    """Base of the wrappers: `compute_dtype` is the graph's matrix precision."""

    def __init__(self, compute_dtype: torch.dtype):
        super().__init__()
        self.compute_dtype = compute_dtype

    def islands(self):
        return fp32_islands(self.compute_dtype)


def _dup(x: torch.Tensor, cfg: bool) -> torch.Tensor:
    """CFG batch layout: [conditional rows; unconditional rows], both halves the same input."""
    return torch.cat([x, x]) if cfg else x


def time_embedding(model: NOVATransformer3DModel, position: torch.Tensor) -> torch.Tensor:
    """VideoPosEmbed of one frame position ([1] float32) -> [1, D] (same ops as VideoPosEmbed.forward)."""
    embed = model.video_pos_embed
    return embed.norm(embed.time_proj(sincos_1d(position).to(embed.time_proj[0].weight.dtype)))


# -------------------------------------------------------------------------------------------------
# Text encoder
# -------------------------------------------------------------------------------------------------
class TextEncoderGraph(GraphModule):
    """input_ids [P, 256] int64 -> Phi-2 last_hidden_state [P, 256, Dt] float32 (causal, no mask)."""

    def __init__(self, encoder: nn.Module, compute_dtype: torch.dtype):
        super().__init__(compute_dtype)
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        with self.islands():
            return self.encoder(input_ids=input_ids).last_hidden_state.float()


# -------------------------------------------------------------------------------------------------
# Temporal encoder
# -------------------------------------------------------------------------------------------------
class _RecordingCache:
    """Prefill: attention reads this step's K/V as they are; they are kept for the cache output."""

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys.append(k)
        self.values.append(v)
        return k, v

    def advance(self, num_tokens: int) -> None:
        pass

    def stacked(self, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[L, M, H, capacity, Dh]: the written positions, then zeros."""
        pad = capacity - self.keys[0].shape[2]
        return (F.pad(torch.stack(self.keys), (0, 0, 0, pad)), F.pad(torch.stack(self.values), (0, 0, 0, pad)))


class _StaticCache:
    """Frame t >= 1: this frame's K/V are scattered into a copy of the fixed-size cache at
    [position, position + Nv); attention reads the whole buffer under a validity mask."""

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, position: torch.Tensor):
        self.k_cache, self.v_cache, self.position = k_cache, v_cache, position
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.position + torch.arange(k.shape[2], device=k.device)  # ScatterElements indices
        index = rows.view(1, 1, -1, 1).expand(k.shape)
        keys = self.k_cache[layer].scatter(2, index, k)
        values = self.v_cache[layer].scatter(2, index, v)
        self.keys.append(keys)
        self.values.append(values)
        return keys, values

    def advance(self, num_tokens: int) -> None:
        pass


class TemporalPrefillGraph(GraphModule):
    """Frame 0: null-filled text (+ motion) condition and BOS frame tokens through the temporal
    encoder. -> indicator (= the anchor) [M, Nv, D] and, for videos, the KV cache [L, M, H, Lmax, Dh]."""

    def __init__(self, model: NOVATransformer3DModel, geometry: Geometry, compute_dtype: torch.dtype):
        super().__init__(compute_dtype)
        self.model, self.geometry = model, geometry
        self.emit_cache = geometry.video

    def forward(self, text_hidden: torch.Tensor, text_lengths: torch.Tensor, frame_position: torch.Tensor,
                motion_flow: torch.Tensor | None = None):
        model, g = self.model, self.geometry
        with self.islands():
            # Null-fill: positions >= the prompt's token count take the learned null feature.
            null = model.text_embed.weight[: g.text_len].to(self.compute_dtype)
            real = torch.arange(g.text_len, device=text_lengths.device).view(1, -1, 1) < text_lengths.view(-1, 1, 1)
            features = torch.where(real, text_hidden.to(self.compute_dtype), null)
            condition = model.condition(features, motion_flow)
            tokens = model.frame_tokens(None, time_embedding(model, frame_position), g.model_batch)
            if not self.emit_cache:
                return model.temporal(tokens, condition, None)
            cache = _RecordingCache()
            indicator = model.temporal(tokens, condition, cache)
            k_cache, v_cache = cache.stacked(g.cache_length)
            return indicator, k_cache, v_cache


class TemporalStepGraph(GraphModule):
    """Frame t >= 1: the previous latent frame through the temporal encoder with the KV cache.

    prev_latent [B, C, h, w] f32, frame_position [1] f32, k/v_cache [L, M, H, Lmax, Dh],
    cache_length [1] int64 (valid positions before this frame), anchor [M, Nv, D] (mixer only)
    -> indicator [M, Nv, D], k/v_cache_out (this frame written at [cache_length, cache_length + Nv)).
    """

    def __init__(self, model: NOVATransformer3DModel, geometry: Geometry, compute_dtype: torch.dtype):
        super().__init__(compute_dtype)
        self.model, self.geometry = model, geometry

    def forward(self, prev_latent: torch.Tensor, frame_position: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, cache_length: torch.Tensor, anchor: torch.Tensor | None = None):
        model, g = self.model, self.geometry
        with self.islands():
            tokens = model.frame_tokens(prev_latent.to(self.compute_dtype),
                                        time_embedding(model, frame_position), g.batch)
            h = _dup(tokens, g.cfg)
            cache = _StaticCache(k_cache, v_cache, cache_length)
            positions = torch.arange(g.cache_length, device=cache_length.device)
            valid = (positions < cache_length + h.shape[1]).view(1, 1, 1, -1)  # block-causal: all before + own frame
            for i, block in enumerate(model.video_encoder.blocks):
                h = block(h, cache, i, valid)
            current = model.video_encoder.norm(h)
            indicator = model.indicator(anchor, current)
            return indicator, torch.stack(cache.keys), torch.stack(cache.values)


# -------------------------------------------------------------------------------------------------
# Spatial encoder
# -------------------------------------------------------------------------------------------------
class SpatialGraph(GraphModule):
    """One mask step of the spatial encoder, exact, on a bucketed number of known-token slots.

    canvas [B, C, h, w] f32 (0 at unknown tokens), known_ids [B, K] int64 (the token order's first K
    ids: distinct, the known tokens first), known_count [1] int64 (k <= K: how many of them are
    known), indicator [M, Nv, D], selected [B, n_max] int64 -> z_selected [M, n_max, D].

    The official encoder half runs on [indicator, the k known tokens], k growing every step. Here it
    runs on [indicator, K slots] with K = k rounded up to a bucket (`Geometry.known_slots`), and a key
    mask hides the slots beyond k, so every query sees exactly the official keys. The encoded slots are
    scattered back (masked slots write back the mask token) and the decoder half runs on all N tokens.
    """

    def __init__(self, model: NOVATransformer3DModel, geometry: Geometry, compute_dtype: torch.dtype):
        super().__init__(compute_dtype)
        self.model, self.geometry = model, geometry

    def forward(self, canvas: torch.Tensor, known_ids: torch.Tensor, known_count: torch.Tensor,
                indicator: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        model, g, encoder = self.model, self.geometry, self.model.image_encoder
        with self.islands():
            position = model.image_space_embed.to(self.compute_dtype)
            # As NOVATransformer3DModel.spatial (same rounding): patch embed, CFG copies, then positions;
            # unknown tokens are the mask token (+ position).
            embedded = _dup(encoder.patch_embed(canvas.to(self.compute_dtype)), g.cfg) + position
            blank = (model.mask_embed.mask_token.to(self.compute_dtype) + position).expand(embedded.shape)
            index = _dup(known_ids, g.cfg).unsqueeze(-1).expand(-1, -1, g.width)
            slot_known = (torch.arange(known_ids.shape[1], device=known_ids.device) < known_count).view(1, -1, 1)
            keys = torch.cat([slot_known.new_ones(1, g.num_video_tokens), slot_known[..., 0]], dim=1).view(1, 1, 1, -1)
            h = torch.cat([indicator, embedded.gather(1, index)], dim=1)
            for block in encoder.blocks[: encoder.encoder_depth]:
                h = block(h, attn_mask=keys)
            condition, encoded = h.split([g.num_video_tokens, known_ids.shape[1]], dim=1)
            written = torch.where(slot_known, encoded, blank.gather(1, index))
            h = torch.cat([condition, blank.scatter(1, index, written)], dim=1)
            for block in encoder.blocks[encoder.encoder_depth:]:
                h = block(h)
            rows = _dup(selected, g.cfg).unsqueeze(-1).expand(-1, -1, h.shape[-1])
            # LayerNorm is per token: normalize only the selected rows.
            return encoder.norm(h[:, g.num_video_tokens:].gather(1, rows))


# -------------------------------------------------------------------------------------------------
# Diffusion head + sampler, and placing the result
# -------------------------------------------------------------------------------------------------
class DenoiseGraph(GraphModule):
    """One diffusion step of the selected tokens, CFG mixing and the sampler update inside.

    x [B, n, 16] f32, z_selected [M, n, D], timestep [1] f32, coefficients [6] f32 (a row of
    `SamplerTable.coefficients`: a, b, r, c, d, e), clip_range [1] f32 (huge: no clipping), noise
    [B, n, 16] f32, guidance_scale [1] f32 -> x_next [B, n, 16] f32:

        out    = head(x) (CFG: u + g (c - u), in fp32)
        pred   = clip((a x + b out) / r, -clip_range, clip_range)
        x_next = c pred + d x + e noise
    """

    def __init__(self, model: NOVATransformer3DModel, geometry: Geometry, compute_dtype: torch.dtype):
        super().__init__(compute_dtype)
        self.model, self.geometry = model, geometry

    def forward(self, x: torch.Tensor, z_selected: torch.Tensor, timestep: torch.Tensor,
                coefficients: torch.Tensor, clip_range: torch.Tensor, noise: torch.Tensor,
                guidance_scale: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        with self.islands():
            model_in = _dup(x.to(self.compute_dtype), g.cfg)
            out = self.model.denoise_head(model_in, timestep.expand(model_in.shape[0]), z_selected).float()
            if g.cfg:
                cond, uncond = out.chunk(2)
                out = uncond + (cond - uncond) * guidance_scale
            a, b, r, c, d, e = coefficients.split(1)
            pred = (a * x + b * out) / r
            pred = torch.minimum(torch.maximum(pred, -clip_range), clip_range)
            return c * pred + d * x + e * noise


class PlaceGraph(GraphModule):
    """canvas [B, C, h, w] f32, x [B, n, 16] f32, selected [B, n] int64, valid [B, n] bool
    -> canvas_out = canvas with x added at the valid selected tokens (the official
    `canvas += unpatchify(sample * pred_mask)`). The ids of one row must be distinct (pad with the
    next ids of the token order); padded rows write their token's old value back."""

    def __init__(self, geometry: Geometry):
        super().__init__(torch.float32)
        self.geometry = geometry

    def forward(self, canvas: torch.Tensor, x: torch.Tensor, selected: torch.Tensor,
                valid: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        tokens = patchify(canvas, g.patch)
        index = selected.unsqueeze(-1).expand(-1, -1, g.token_dim)
        update = tokens.gather(1, index) + torch.where(valid.unsqueeze(-1), x, torch.zeros_like(x))
        return unpatchify(tokens.scatter(1, index, update), g.patch, *g.latent_size)


# -------------------------------------------------------------------------------------------------
# VAE
# -------------------------------------------------------------------------------------------------
def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """[B, 3, (T,) H, W] in [-1, 1] -> channels-last uint8, truncated like the official `.byte()`
    (an explicit floor, so backends whose float->uint8 cast rounds agree)."""
    order = (0, 2, 3, 4, 1) if pixels.dim() == 5 else (0, 2, 3, 1)
    return (pixels.float().permute(order) * 127.5 + 127.5).clamp(0, 255).floor().to(torch.uint8)


class VAEDecoderGraph(GraphModule):
    """Scaled latents [B', C, h, w] (image VAE) or [B', C, Tw, h, w] (one temporal window of the video
    VAE, Tw <= 5) -> uint8 pixels [B', H, W, 3] or [B', 1 + 4 (Tw - 1), H, W, 3]."""

    def __init__(self, vae: nn.Module, compute_dtype: torch.dtype):
        super().__init__(compute_dtype)
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        with self.islands():
            return to_uint8(self.vae.decode(vae_ops.unscale(self.vae, latents.to(self.compute_dtype))).sample)


class VAEEncoderGraph(GraphModule):
    """Image-to-video: image [1, H, W, 3] uint8 and noise [1, C, h, w] f32 -> the scaled posterior
    sample [1, C, h, w] f32 (noise * std + mean in fp32, as the official encode)."""

    def __init__(self, vae: nn.Module, compute_dtype: torch.dtype):
        super().__init__(compute_dtype)
        self.vae = vae

    def forward(self, image: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        with self.islands():
            pixels = ((image.to(self.compute_dtype) - 127.5) / 127.5).permute(0, 3, 1, 2)
            posterior = self.vae.encode(pixels).latent_dist
            sample = noise * posterior.std.float() + posterior.mean.float()
            return vae_ops.scale(self.vae, sample.to(self.compute_dtype)).float()
