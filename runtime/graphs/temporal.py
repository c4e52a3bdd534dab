"""The temporal graphs: `temporal_prefill` (frame 0: text, motion and BOS tokens; writes the KV cache)
and `temporal_step` (frames t >= 1 over the static KV cache)."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from runtime.graphs.common import GraphModule, cfg_rows, time_embedding
from runtime.graphs.contract import GraphContext, GraphSpec, randint, randn, sources, tensor
from runtime.graphs.profile import Geometry, frame_position
from runtime.guidance_plan import GuidancePlan
from runtime.model.transformer import NOVATransformer3DModel

SOURCES = sources(__name__)


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
        pass  # the positions are implied: the prefill writes [0, Lc + Nv)

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


def guidance_tokens(model: NOVATransformer3DModel, tokens: torch.Tensor, raw_bos: torch.Tensor | None) -> torch.Tensor:
    """Frame tokens [M, Nv, D] with the rows where `raw_bos` [M] is true replaced by the raw BOS token (no time
    or space embedding): image guidance's unconditional block, at every frame (`GuidancePlan.raw_bos_block`)."""
    if raw_bos is None:  # two-block builds have no such rows
        return tokens
    return torch.where(raw_bos.view(-1, 1, 1), model.mask_embed.bos_token.to(tokens.dtype), tokens)


def _with_raw_bos(sample: dict[str, torch.Tensor], g: Geometry) -> dict[str, torch.Tensor]:
    """A temporal graph's sample inputs with `raw_bos` where the build has three guidance blocks, as an
    image-guidance request feeds it."""
    if g.blocks == 3:
        sample["raw_bos"] = torch.from_numpy(GuidancePlan(scale=2, image_scale=1).raw_bos(g.blocks, g.batch))
    return sample


class TemporalPrefillGraph(GraphModule):
    """`temporal_prefill`: null-filled text (+ motion) condition and BOS frame tokens through the temporal
    encoder. -> indicator (= the anchor) [M, Nv, D] and, for videos, the KV cache [L, M, H, Lmax, Dh]."""

    def __init__(self, model: NOVATransformer3DModel, geometry: Geometry, compute_dtype: torch.dtype):
        super().__init__(compute_dtype)
        self.model, self.geometry = model, geometry

    def forward(self, text_hidden: torch.Tensor, text_lengths: torch.Tensor, frame_position: torch.Tensor,
                motion_flow: torch.Tensor | None = None, raw_bos: torch.Tensor | None = None):
        model, g = self.model, self.geometry
        with self.islands():
            # Null-fill: positions >= the prompt's token count take the learned null feature.
            null = model.text_embed.weight[: g.text_len].to(self.compute_dtype)
            real = torch.arange(g.text_len, device=text_lengths.device).view(1, -1, 1) < text_lengths.view(-1, 1, 1)
            features = torch.where(real, text_hidden.to(self.compute_dtype), null)
            condition = model.condition(features, motion_flow)
            tokens = guidance_tokens(model, model.frame_tokens(None, time_embedding(model, frame_position),
                                                               g.model_batch), raw_bos)
            if not g.video:
                return model.temporal(tokens, condition, None)
            cache = _RecordingCache()
            indicator = model.temporal(tokens, condition, cache)
            k_cache, v_cache = cache.stacked(g.cache_length)
            return indicator, k_cache, v_cache


def temporal_prefill_spec(ctx: GraphContext) -> GraphSpec:
    g, name = ctx.geometry, "temporal_prefill"
    M, L, H, Lmax, Dh, act = g.model_batch, g.video_depth, g.num_heads, g.cache_length, g.head_dim, ctx.dtype_name(name)
    inputs = [tensor("text_hidden", "float32", M, g.text_len, g.text_dim),  # Phi-2 features per CFG row
              tensor("text_lengths", "int64", M),  # real tokens per row; 0 = empty prompt (all null features)
              tensor("frame_position", "float32", 1)]  # frame_position(0, T, base_t) = 0
    if g.has_motion:
        inputs.append(tensor("motion_flow", "float32", M))  # per row (default 5)
    if g.blocks == 3:
        inputs.append(tensor("raw_bos", "bool", M))  # rows taking the raw BOS token (image guidance's uncond)
    outputs = [tensor("indicator", act, M, g.num_video_tokens, g.width)]  # spatial condition of frame 0 = anchor
    if g.video:  # positions [0, Lc + Nv) written
        outputs += [tensor("k_cache", act, L, M, H, Lmax, Dh), tensor("v_cache", act, L, M, H, Lmax, Dh)]

    def temporal_prefill_sample(values: dict[str, int], gen: torch.Generator) -> dict[str, torch.Tensor]:
        lengths = randint(0, g.text_len + 1, (M,), gen)
        lengths[-1] = 0  # an empty (negative) prompt
        out = {"text_hidden": randn((M, g.text_len, g.text_dim), gen), "text_lengths": lengths,
               "frame_position": torch.zeros(1)}
        if g.has_motion:
            out["motion_flow"] = torch.rand(M, generator=gen) * 9 + 1
        return _with_raw_bos(out, g)

    return GraphSpec(
        name=name, precision=ctx.precisions[name],
        doc="Frame 0 of the temporal encoder: null-fill, text projection (+ motion tokens), BOS frame tokens "
            "with time and space embeddings, all blocks; writes the KV cache for videos.",
        inputs=tuple(inputs), outputs=tuple(outputs), dims={}, component="transformer",
        weight_prefixes=("text_embed.", "motion_embed.", "video_pos_embed.", "mask_embed.bos_token", "video_encoder."),
        sources=SOURCES, attention=ctx.attention, sample=temporal_prefill_sample,
        build=lambda: TemporalPrefillGraph(ctx.module("transformer", name), g, ctx.dtype(name)).eval())


class TemporalStepGraph(GraphModule):
    """`temporal_step`: the previous latent frame through the temporal encoder with the KV cache.

    prev_latent [B, C, h, w] f32, frame_position [1] f32, k/v_cache [L, M, H, Lmax, Dh],
    cache_length [1] int64 (valid positions before this frame), anchor [M, Nv, D] (mixer only)
    -> indicator [M, Nv, D], k/v_cache_out (this frame written at [cache_length, cache_length + Nv)).
    """

    def __init__(self, model: NOVATransformer3DModel, geometry: Geometry, compute_dtype: torch.dtype):
        super().__init__(compute_dtype)
        self.model, self.geometry = model, geometry

    def forward(self, prev_latent: torch.Tensor, frame_position: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, cache_length: torch.Tensor, anchor: torch.Tensor | None = None,
                raw_bos: torch.Tensor | None = None):
        model, g = self.model, self.geometry
        with self.islands():
            tokens = model.frame_tokens(prev_latent.to(self.compute_dtype),
                                        time_embedding(model, frame_position), g.batch)
            h = guidance_tokens(model, cfg_rows(tokens, g.blocks), raw_bos)
            cache = _StaticCache(k_cache, v_cache, cache_length)
            positions = torch.arange(g.cache_length, device=cache_length.device)
            valid = (positions < cache_length + h.shape[1]).view(1, 1, 1, -1)  # block-causal: all before + own frame
            for i, block in enumerate(model.video_encoder.blocks):
                h = block(h, cache, i, valid)
            current = model.video_encoder.norm(h)
            indicator = model.indicator(anchor, current)
            return indicator, torch.stack(cache.keys), torch.stack(cache.values)


def temporal_step_spec(ctx: GraphContext) -> GraphSpec | None:
    g, name = ctx.geometry, "temporal_step"
    if not g.video:
        return None
    B, M, Nv, L, H, Lmax, Dh = g.batch, g.model_batch, g.num_video_tokens, g.video_depth, g.num_heads, g.cache_length, \
        g.head_dim
    act = ctx.dtype_name(name)
    inputs = [tensor("prev_latent", "float32", B, g.channels, *g.latent_size),  # latent frame t-1 (scaled)
              tensor("frame_position", "float32", 1),  # frame_position(t, T, base_t)
              tensor("k_cache", act, L, M, H, Lmax, Dh), tensor("v_cache", act, L, M, H, Lmax, Dh),
              tensor("cache_length", "int64", 1)]  # valid positions before this frame: Lc + t * Nv
    if g.has_mixer:
        inputs.append(tensor("anchor", act, M, Nv, g.width))  # indicator of frame 0
    if g.blocks == 3:
        inputs.append(tensor("raw_bos", "bool", M))  # as temporal_prefill's

    def temporal_step_sample(values: dict[str, int], gen: torch.Generator) -> dict[str, torch.Tensor]:
        frame = int(randint(1, g.max_latent_length, (1,), gen))
        length = g.condition_len + frame * Nv
        valid = (torch.arange(Lmax) < length).view(1, 1, 1, -1, 1)
        cache = lambda: (randn((L, M, H, Lmax, Dh), gen) * valid).to(ctx.dtype(name))  # noqa: E731
        out = {"prev_latent": randn((B, g.channels, *g.latent_size), gen),
               "frame_position": torch.tensor(frame_position(frame, g.max_latent_length, g.base_t)),
               "k_cache": cache(), "v_cache": cache(), "cache_length": torch.tensor([length])}
        if g.has_mixer:
            out["anchor"] = randn((M, Nv, g.width), gen, ctx.dtype(name))
        return _with_raw_bos(out, g)

    return GraphSpec(
        name=name, precision=ctx.precisions[name],
        doc="Frame t >= 1 of the temporal encoder over the static KV cache (ScatterElements write at "
            "cache_length, boolean key mask over the valid positions), then the scale/shift mixer with the "
            "anchor. Outputs are new buffers (ping-pong): do not bind an input buffer as an output.",
        inputs=tuple(inputs),
        outputs=(tensor("indicator", act, M, Nv, g.width), tensor("k_cache_out", act, L, M, H, Lmax, Dh),
                 tensor("v_cache_out", act, L, M, H, Lmax, Dh)),
        dims={}, component="transformer", weight_prefixes=("video_pos_embed.", "video_encoder."),
        sources=SOURCES, attention=ctx.attention, sample=temporal_step_sample,
        build=lambda: TemporalStepGraph(ctx.module("transformer", name), g, ctx.dtype(name)).eval())
