"""The end of a mask step: `denoise` (one diffusion step of the selected tokens: the diffusion head,
CFG mixing and the sampler update) and `place` (the sampled tokens into the canvas)."""

from __future__ import annotations

import torch

from runtime.graphs.common import GraphModule, cfg_rows
from runtime.graphs.contract import GraphContext, GraphSpec, randint, randn, random_orders, sources, tensor
from runtime.graphs.profile import NO_CLIP, Geometry
from runtime.model.transformer import NOVATransformer3DModel, patchify, unpatchify
from runtime.schedules import SamplerTable

SOURCES = sources("runtime/graphs/denoise.py", "runtime/model/transformer.py", "runtime/model/config.py")


class DenoiseGraph(GraphModule):
    """`denoise`: one diffusion step of the selected tokens, CFG mixing and the sampler update inside.

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
            model_in = cfg_rows(x.to(self.compute_dtype), g.cfg)
            out = self.model.denoise_head(model_in, timestep.expand(model_in.shape[0]), z_selected).float()
            if g.cfg:
                cond, uncond = out.chunk(2)
                out = uncond + (cond - uncond) * guidance_scale
            a, b, r, c, d, e = coefficients.split(1)
            pred = (a * x + b * out) / r
            pred = torch.minimum(torch.maximum(pred, -clip_range), clip_range)
            return c * pred + d * x + e * noise


def denoise_spec(ctx: GraphContext) -> GraphSpec:
    g, name = ctx.geometry, "denoise"
    B, M, n, td = g.batch, g.model_batch, g.max_tokens_per_step, g.token_dim
    table = SamplerTable.from_config(ctx.configs.scheduler, 25)
    clip = table.clip_range if table.clip_range is not None else NO_CLIP

    def denoise_sample(values: dict[str, int], gen: torch.Generator) -> dict[str, torch.Tensor]:
        step = int(randint(0, len(table.timesteps), (1,), gen))
        return {"x": randn((B, n, td), gen), "z_selected": randn((M, n, g.width), gen, ctx.dtype(name)),
                "timestep": torch.from_numpy(table.timesteps[step:step + 1].copy()),
                "coefficients": torch.from_numpy(table.coefficients[step].copy()),
                "clip_range": torch.tensor([float(clip)]), "noise": randn((B, n, td), gen),
                "guidance_scale": torch.rand(1, generator=gen) * 6 + 1.5}

    return GraphSpec(
        name=name, precision=ctx.precisions[name],
        doc="One diffusion step of the selected tokens: diffusion MLP on M rows, CFG mixing and the sampler "
            "update in fp32. Rows are independent, so padded rows are harmless.",
        inputs=(tensor("x", "float32", B, n, td),  # current sample of the selected tokens
                tensor("z_selected", ctx.dtype_name(name), M, n, g.width),
                tensor("timestep", "float32", 1),  # SamplerTable.timesteps[j]
                tensor("coefficients", "float32", table.coefficients.shape[1]),  # a, b, r, c, d, e
                tensor("clip_range", "float32", 1),  # SamplerTable.clip_range, or NO_CLIP
                tensor("noise", "float32", B, n, td),  # the step noise (the initial noise goes in x)
                tensor("guidance_scale", "float32", 1)),
        outputs=(tensor("x_next", "float32", B, n, td),),
        dims={}, component="transformer", weight_prefixes=("image_decoder.",),
        sources=SOURCES + ("runtime/schedules.py",), sample=denoise_sample,
        build=lambda: DenoiseGraph(ctx.module("transformer", name), g, ctx.dtype(name)).eval())


class PlaceGraph(GraphModule):
    """`place`: canvas [B, C, h, w] f32, x [B, n, 16] f32, selected [B, n] int64, valid [B, n] bool
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


def place_spec(ctx: GraphContext) -> GraphSpec:
    g, name = ctx.geometry, "place"
    B, N, n, td, canvas = g.batch, g.num_tokens, g.max_tokens_per_step, g.token_dim, (g.channels, *g.latent_size)

    def place_sample(values: dict[str, int], gen: torch.Generator) -> dict[str, torch.Tensor]:
        count = int(randint(1, n + 1, (1,), gen))
        order, first = random_orders(B, N, gen), int(randint(0, N, (1,), gen))
        return {"canvas": randn((B, *canvas), gen), "x": randn((B, n, td), gen),
                "selected": order[:, (first + torch.arange(n)) % N],  # distinct ids: a cyclic window of an order
                "valid": (torch.arange(n) < count).expand(B, -1).clone()}

    return GraphSpec(
        name=name, precision=ctx.precisions[name],
        doc="Adds the sampled tokens into the canvas (ScatterElements of distinct ids; padded rows write their "
            "old value back).",
        inputs=(tensor("canvas", "float32", B, *canvas), tensor("x", "float32", B, n, td),
                tensor("selected", "int64", B, n), tensor("valid", "bool", B, n)),  # valid: this step's real tokens
        outputs=(tensor("canvas_out", "float32", B, *canvas),),
        dims={}, component=None, weight_prefixes=(), sources=SOURCES, sample=place_sample,
        build=lambda: PlaceGraph(g).eval())
