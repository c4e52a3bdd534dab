"""The end of a mask step: `denoise` (one diffusion step of the selected tokens: the diffusion head,
CFG mixing and the sampler update), `place` (the sampled tokens into the canvas), and `denoise_loop`
(all of a mask step's diffusion steps, unrolled for the build's step count, then the placing: one
launch per mask step instead of one per diffusion step). The loop and the single-step graphs run the
same functions: `step_modulations` (the head's work that does not depend on the step's sample, for all
steps at once), `diffusion_step` and `place_tokens`.

The rows of the head are 2-D [M * n, D] (Linear is one Gemm with its bias, no Reshapes around it) and
each per-step input is cut into its steps by one Split for all steps: an unrolled loop of small matrices
costs per node launched, not per FLOP."""

from __future__ import annotations

from typing import NamedTuple

import torch

from runtime.graphs.common import GraphModule, cfg_rows
from runtime.graphs.contract import GraphContext, GraphSpec, randint, randn, random_orders, sources, tensor
from runtime.graphs.profile import NO_CLIP, Geometry
from runtime.model.transformer import (DiffusionMLP, Modulations, NOVATransformer3DModel, patchify, step_chunks,
                                       unpatchify)
from runtime.schedules import SamplerTable

SOURCES = sources(__name__)


class StepScalars(NamedTuple):
    """One diffusion step's scalar inputs, [1] each."""
    coefficients: tuple[torch.Tensor, ...]  # its `SamplerTable` row: a, b, r, c, d, e
    guidance_scale: torch.Tensor
    guided: torch.Tensor  # bool: guidance_scale > 1 (<= 1 turns guidance off for the step)


def step_scalars(coefficients: torch.Tensor, guidance_scale: torch.Tensor) -> list[StepScalars]:
    """coefficients [S, 6] (or [6] for one step), guidance_scale [S] -> per step, its `StepScalars`: every
    value cut out by one Split for all steps, where indexing would cost nodes per step."""
    steps, width = guidance_scale.shape[0], coefficients.shape[-1]
    values = coefficients.flatten().split(1)
    rows = (values[j:j + width] for j in range(0, len(values), width))
    return [StepScalars(*step) for step in zip(rows, step_chunks(guidance_scale, steps),
                                                 step_chunks(guidance_scale > 1, steps))]


def step_modulations(head: DiffusionMLP, z_selected: torch.Tensor, timesteps: torch.Tensor) -> list[Modulations]:
    """z_selected [M, n, D], timesteps [S] -> per step, the head's AdaNorm modulations of the M * n rows
    (`DiffusionMLP.modulations`): none of it depends on a step's sample, so all of it precedes the first step."""
    return head.modulations(head.time_cond_embed.condition_proj(z_selected.flatten(0, 1)), timesteps)


def diffusion_step(head: DiffusionMLP, geometry: Geometry, compute_dtype: torch.dtype, x: torch.Tensor,
                   modulations: Modulations, scalars: StepScalars, clip_range: torch.Tensor, noise: torch.Tensor,
                   third_scale: torch.Tensor | None = None, image_guidance: torch.Tensor | None = None) -> torch.Tensor:
    """One diffusion step (see DenoiseGraph) of the rows x [B * n, 16] f32 given the step's modulations and
    scalars. -> x_next [B * n, 16] f32."""
    out = head.network(cfg_rows(x.to(compute_dtype), geometry.blocks), modulations).float()
    if geometry.blocks > 1:  # a scale <= 1 turns guidance off for the step: exactly the conditional output
        cond, uncond, *third = out.chunk(geometry.blocks)
        out = torch.where(scalars.guided, _combine(cond, uncond, third, scalars.guidance_scale, third_scale,
                                                   image_guidance), cond)
    return _sampler_update(x, out, scalars.coefficients, clip_range, noise)


def _sampler_update(x: torch.Tensor, out: torch.Tensor, coefficients: tuple[torch.Tensor, ...],
                    clip_range: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """A `SamplerTable` row (a, b, r, c, d, e) applied in fp32: clip((a x + b out) / r) then c pred + d x + e noise."""
    a, b, r, c, d, e = coefficients
    pred = (a * x + b * out) / r
    pred = torch.minimum(torch.maximum(pred, -clip_range), clip_range)
    return c * pred + d * x + e * noise


def _combine(cond: torch.Tensor, uncond: torch.Tensor, third: list[torch.Tensor], scale: torch.Tensor,
             third_scale: torch.Tensor | None, image_guidance: torch.Tensor | None) -> torch.Tensor:
    """`Guidance.combine` without renorm, in its float operation order (the selects pick operands, exactly):
    image (u + g (c - i)) + g_img (i - u); spatiotemporal (u + g (c - u)) + g_st (c - p). Plain CFG on a
    three-block build is the spatiotemporal form with g_st = 0: adding 0 * (c - p) leaves u + g (c - u) exact."""
    guided, third_term = _guidance_terms(cond, uncond, third, scale, third_scale, image_guidance)
    return guided if third_term is None else guided + third_term


def _guidance_terms(cond: torch.Tensor, uncond: torch.Tensor, third: list[torch.Tensor], scale: torch.Tensor,
                    third_scale: torch.Tensor | None, image_guidance: torch.Tensor | None):
    """-> (the guided term that guidance_renorm rescales, the third pass's term added after it, or None)."""
    if not third:
        return uncond + (cond - uncond) * scale, None
    (p,) = third
    guided = uncond + (cond - torch.where(image_guidance, p, uncond)) * scale
    return guided, (torch.where(image_guidance, p, cond) - torch.where(image_guidance, uncond, p)) * third_scale


def renormed_step(head: DiffusionMLP, geometry: Geometry, compute_dtype: torch.dtype, grid: torch.Tensor,
                  selected: torch.Tensor, valid: torch.Tensor, modulations: Modulations, scalars: StepScalars,
                  clip_range: torch.Tensor, noise: torch.Tensor, renorm: torch.Tensor,
                  third_scale: torch.Tensor | None = None, image_guidance: torch.Tensor | None = None) -> torch.Tensor:
    """One diffusion step over the whole token grid [B, N, 16], as the official head returns it: the selected
    tokens take the head's output, every other token (the padded rows too) keeps its input in every block,
    so the guided and conditional grids equal x there. guidance_renorm (< 1) scales each sample's guided term
    by clamp(|cond| / |guided|, renorm, 1), norms over the whole grid; then the sampler steps every token."""
    index = selected.unsqueeze(-1).expand(-1, -1, geometry.token_dim)
    x = grid.gather(1, index)
    model_in = cfg_rows(x.flatten(0, 1).to(compute_dtype), geometry.blocks)
    out = head.network(model_in, modulations).float().view(-1, *x.shape[1:])
    cond, uncond, *third = (torch.where(valid.unsqueeze(-1), block, x) for block in out.chunk(geometry.blocks))
    guided, third_term = _guidance_terms(cond, uncond, third, scalars.guidance_scale, third_scale, image_guidance)
    cond_grid, guided_grid = grid.scatter(1, index, cond), grid.scatter(1, index, guided)
    one = torch.ones_like(renorm)
    ratio = cond_grid.norm(dim=(1, 2), keepdim=True) / guided_grid.norm(dim=(1, 2), keepdim=True)
    guided_grid = guided_grid * torch.where(renorm < 1, torch.minimum(torch.maximum(ratio, renorm), one), one)
    if third_term is not None:
        guided_grid = guided_grid + torch.zeros_like(grid).scatter(1, index, third_term)
    return _sampler_update(grid, torch.where(scalars.guided, guided_grid, cond_grid), scalars.coefficients,
                           clip_range, noise)


def place_tokens(geometry: Geometry, canvas: torch.Tensor, x: torch.Tensor, selected: torch.Tensor,
                 valid: torch.Tensor) -> torch.Tensor:
    """canvas with x added at the valid selected tokens (see PlaceGraph)."""
    tokens = patchify(canvas, geometry.patch)
    index = selected.unsqueeze(-1).expand(-1, -1, geometry.token_dim)
    update = tokens.gather(1, index) + torch.where(valid.unsqueeze(-1), x, torch.zeros_like(x))
    return unpatchify(tokens.scatter(1, index, update), geometry.patch, *geometry.latent_size)


class DenoiseGraph(GraphModule):
    """`denoise`: one diffusion step of the selected tokens, CFG mixing and the sampler update inside.

    x [B, n, 16] f32, z_selected [M, n, D], timestep [1] f32, coefficients [6] f32 (a row of
    `SamplerTable.coefficients`: a, b, r, c, d, e), clip_range [1] f32 (huge: no clipping), noise
    [B, n, 16] f32, guidance_scale [1] f32 -> x_next [B, n, 16] f32:

        out    = head(x) (CFG: u + g (c - u) in fp32 where g > 1, else c: guidance off, as guidance_scale <= 1
                 and guidance_trunc turn it off officially; three-block builds also take third_scale [1] f32
                 and image_guidance [1] bool and combine as `runtime.guidance.Guidance.combine`)
        pred   = clip((a x + b out) / r, -clip_range, clip_range)
        x_next = c pred + d x + e noise
    """

    def __init__(self, model: NOVATransformer3DModel, geometry: Geometry, compute_dtype: torch.dtype):
        super().__init__(compute_dtype)
        self.head, self.geometry = model.image_decoder, geometry

    def forward(self, x: torch.Tensor, z_selected: torch.Tensor, timestep: torch.Tensor,
                coefficients: torch.Tensor, clip_range: torch.Tensor, noise: torch.Tensor,
                guidance_scale: torch.Tensor, third_scale: torch.Tensor | None = None,
                image_guidance: torch.Tensor | None = None) -> torch.Tensor:
        with self.islands():  # the loop's functions at S = 1
            (modulations,) = step_modulations(self.head, z_selected, timestep)
            (scalars,) = step_scalars(coefficients, guidance_scale)
            x_next = diffusion_step(self.head, self.geometry, self.compute_dtype, x.flatten(0, 1), modulations,
                                    scalars, clip_range, noise.flatten(0, 1), third_scale, image_guidance)
            return x_next.view_as(x)


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
                "guidance_scale": torch.rand(1, generator=gen) * 6 + 1.5, **_third_pass_sample(g, gen)}

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
                tensor("guidance_scale", "float32", 1), *_third_pass_inputs(g)),
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
        return place_tokens(self.geometry, canvas, x, selected, valid)


def place_spec(ctx: GraphContext) -> GraphSpec:
    g, name = ctx.geometry, "place"
    B, n, td, canvas = g.batch, g.max_tokens_per_step, g.token_dim, (g.channels, *g.latent_size)

    def place_sample(values: dict[str, int], gen: torch.Generator) -> dict[str, torch.Tensor]:
        return {"canvas": randn((B, *canvas), gen), "x": randn((B, n, td), gen), **_token_window(g, gen)}

    return GraphSpec(
        name=name, precision=ctx.precisions[name],
        doc="Adds the sampled tokens into the canvas (ScatterElements of distinct ids; padded rows write their "
            "old value back).",
        inputs=(tensor("canvas", "float32", B, *canvas), tensor("x", "float32", B, n, td),
                tensor("selected", "int64", B, n), tensor("valid", "bool", B, n)),  # valid: this step's real tokens
        outputs=(tensor("canvas_out", "float32", B, *canvas),),
        dims={}, component=None, weight_prefixes=(), sources=SOURCES, sample=place_sample,
        build=lambda: PlaceGraph(g).eval())


def _token_window(g: Geometry, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Sample `selected` and `valid`: distinct ids per row (a cyclic window of a token order), some of them valid."""
    B, N, n = g.batch, g.num_tokens, g.max_tokens_per_step
    count = int(randint(1, n + 1, (1,), gen))
    order, first = random_orders(B, N, gen), int(randint(0, N, (1,), gen))
    return {"selected": order[:, (first + torch.arange(n)) % N],
            "valid": (torch.arange(n) < count).expand(B, -1).clone()}


class DenoiseLoopGraph(GraphModule):
    """`denoise_loop`: a mask step's whole diffusion loop, unrolled for `steps` steps, then `place`.

    canvas [B, C, h, w] f32, x [B, n, 16] f32 (the initial noise rows), z_selected [M, n, D],
    timesteps [S] f32, coefficients [S, 6] f32 (`SamplerTable`), clip_range [1] f32, noise [S, B, n, 16]
    f32 (step j's noise rows, zeros where the sampler adds none), guidance_scale [S] f32 (step j's; <= 1: off), selected
    [B, n] int64, valid [B, n] bool -> canvas_out [B, C, h, w] f32: S `denoise` steps and `place`, the
    same functions on the same inputs, except that the step-independent work is done once for all S steps
    (`step_modulations`: z_selected's condition projection, the S timestep embeddings, one AdaNorm
    projection over [S * M * n, D] per AdaNorm; `step_scalars`; the noise rows split once).
    Three-block builds: third_scale [1] f32 and image_guidance [1] bool after valid (as `denoise`'s; a
    truncated step's guidance_scale of 1 already selects the conditional output, so one third scale serves).
    Builds with guidance_renorm: x and noise hold the whole token grid ([B, N, 16], [S, B, N, 16]) and renorm
    [1] f32 is an input (`renormed_step`; >= 1: off, the same numbers as the selected rows alone).
    """

    def __init__(self, model: NOVATransformer3DModel, geometry: Geometry, compute_dtype: torch.dtype, steps: int):
        super().__init__(compute_dtype)
        self.head, self.geometry, self.steps = model.image_decoder, geometry, steps

    def forward(self, canvas: torch.Tensor, x: torch.Tensor, z_selected: torch.Tensor, timesteps: torch.Tensor,
                coefficients: torch.Tensor, clip_range: torch.Tensor, noise: torch.Tensor,
                guidance_scale: torch.Tensor, selected: torch.Tensor, valid: torch.Tensor,
                third_scale: torch.Tensor | None = None, image_guidance: torch.Tensor | None = None,
                renorm: torch.Tensor | None = None) -> torch.Tensor:
        g, shape = self.geometry, x.shape
        with self.islands():
            steps = zip(step_modulations(self.head, z_selected, timesteps), step_scalars(coefficients, guidance_scale))
            if renorm is None:  # the selected rows, 2-D [B * n, 16] from the first step to the last
                x = x.flatten(0, 1)
                for noise_j, (modulations, scalars) in zip(step_chunks(noise.flatten(0, 2), self.steps), steps):
                    x = diffusion_step(self.head, g, self.compute_dtype, x, modulations, scalars, clip_range,
                                       noise_j, third_scale, image_guidance)
                x = x.view(shape)
            else:  # the whole grid [B, N, 16]; then the selected tokens' rows
                for noise_j, (modulations, scalars) in zip(step_chunks(noise.flatten(0, 1), self.steps), steps):
                    x = renormed_step(self.head, g, self.compute_dtype, x, selected, valid, modulations, scalars,
                                      clip_range, noise_j, renorm, third_scale, image_guidance)
                x = x.gather(1, selected.unsqueeze(-1).expand(-1, -1, g.token_dim))
        return place_tokens(g, canvas, x, selected, valid)


def _third_pass_inputs(g: Geometry) -> tuple:
    """The third guidance pass's inputs of the diffusion graphs (three-block builds only)."""
    if g.blocks < 3:
        return ()
    return (tensor("third_scale", "float32", 1),  # image_ or spatiotemporal_guidance_scale (0: plain CFG)
            tensor("image_guidance", "bool", 1))  # true: image guidance's combine, else the spatiotemporal one


def _third_pass_sample(g: Geometry, gen: torch.Generator) -> dict[str, torch.Tensor]:
    if g.blocks < 3:
        return {}
    return {"third_scale": torch.rand(1, generator=gen) * 3, "image_guidance": torch.rand(1, generator=gen) < 0.5}


def _step_guidance(steps: int, gen: torch.Generator) -> torch.Tensor:
    """Per-step guidance scales as a truncated request has them: a scale > 1, then 1 (off) from a random step."""
    off_from = int(randint(1, steps + 1, (1,), gen))
    return torch.where(torch.arange(steps) < off_from, torch.rand(1, generator=gen) * 6 + 1.5, torch.ones(1))


def denoise_loop_spec(ctx: GraphContext) -> GraphSpec:
    g, name, S = ctx.geometry, "denoise_loop", ctx.profile.diffusion_steps
    B, M, n, td, canvas = g.batch, g.model_batch, g.max_tokens_per_step, g.token_dim, (g.channels, *g.latent_size)
    table = SamplerTable.from_config(ctx.configs.scheduler, S)
    clip = table.clip_range if table.clip_range is not None else NO_CLIP

    rows = g.num_tokens if ctx.profile.guidance_renorm else n  # the whole token grid, or the selected rows
    renorm = (tensor("renorm", "float32", 1),) if ctx.profile.guidance_renorm else ()

    def denoise_loop_sample(values: dict[str, int], gen: torch.Generator) -> dict[str, torch.Tensor]:
        adds_noise = torch.tensor([table.draws_noise(j) for j in range(S)]).view(S, 1, 1, 1)
        extra = {"renorm": torch.rand(1, generator=gen) * 0.9 + 0.05} if renorm else {}
        return {**extra, "canvas": randn((B, *canvas), gen), "x": randn((B, rows, td), gen),
                "z_selected": randn((M, n, g.width), gen, ctx.dtype(name)),
                "timesteps": torch.from_numpy(table.timesteps.copy()),
                "coefficients": torch.from_numpy(table.coefficients.copy()),
                "clip_range": torch.tensor([float(clip)]), "noise": randn((S, B, rows, td), gen) * adds_noise,
                "guidance_scale": _step_guidance(S, gen), **_token_window(g, gen), **_third_pass_sample(g, gen)}

    return GraphSpec(
        name=name, precision=ctx.precisions[name],
        doc=f"A mask step's {S} diffusion steps (denoise, unrolled; the step-independent work once) and "
            "place: one launch per mask step. Requests with another num_diffusion_steps run denoise and place.",
        inputs=(tensor("canvas", "float32", B, *canvas),
                tensor("x", "float32", B, rows, td),  # the initial noise of the selected tokens (or all)
                tensor("z_selected", ctx.dtype_name(name), M, n, g.width),
                tensor("timesteps", "float32", S),  # SamplerTable.timesteps
                tensor("coefficients", "float32", S, table.coefficients.shape[1]),  # SamplerTable.coefficients
                tensor("clip_range", "float32", 1),  # SamplerTable.clip_range, or NO_CLIP
                tensor("noise", "float32", S, B, rows, td),  # each step's noise, zeros where the sampler adds none
                tensor("guidance_scale", "float32", S),  # per diffusion step: guidance_trunc turns it off
                tensor("selected", "int64", B, n), tensor("valid", "bool", B, n), *_third_pass_inputs(g), *renorm),
        outputs=(tensor("canvas_out", "float32", B, *canvas),),
        dims={}, component="transformer", weight_prefixes=("image_decoder.",),
        sources=SOURCES + ("runtime/schedules.py",), sample=denoise_loop_sample,
        build=lambda: DenoiseLoopGraph(ctx.module("transformer", name), g, ctx.dtype(name), S).eval())
