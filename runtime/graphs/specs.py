"""One declaration per graph: name, inputs/outputs (dtype, symbolic shape), dynamic dims, sample
inputs and the torch module computing it. Export, validation, the engine build and the runner all
read these, so the names, dtypes and shapes below are the runner's contract.

    specs = build_specs(Checkpoint(folder), BuildProfile(), precision="fp16")
    spec = specs["spatial"]
    module = spec.build()                      # runtime.graphs.modules.SpatialGraph
    inputs = spec.sample(spec.dims_at("opt"), torch.Generator().manual_seed(0))
    outputs = module(**inputs)

Symbols (see `Geometry`): B images per call, M = B or 2B with CFG, N image tokens, Nv video
tokens, D width, Dt text width, Lc condition tokens, C latent channels, h x w latent, n_max
tokens per mask step, L temporal layers, H heads, Dh head width, Lmax = Lc + T_max * Nv.

Conventions shared with the runner:
- latent-space tensors (canvas, x, noise, latents, previous frame) are float32 at every precision;
  activations passed between transformer graphs (indicator, KV cache, z_selected) use the graph's
  compute dtype;
- CFG rows are [conditional; unconditional]; graphs duplicate their B-row inputs themselves;
- `selected` holds distinct token ids per row: this step's tokens, padded with the next ids of the
  token order (`valid` marks the real ones);
- randomness (token order, noise) and schedules (SamplerTable rows) come from the host.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from runtime.graphs.modules import (TORCH_DTYPES, DenoiseGraph, PlaceGraph, SpatialGraph, TemporalPrefillGraph,
                                    TemporalStepGraph, TextEncoderGraph, VAEDecoderGraph, VAEEncoderGraph,
                                    cast_module)
from runtime.graphs.profile import (NO_CLIP, VIDEO_VAE_WINDOW, BuildProfile, Geometry, component_precision,
                                    frame_position)

DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
               "int64": torch.int64, "uint8": torch.uint8, "bool": torch.bool}
COMPUTE_DTYPE_NAME = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
GRAPH_NAMES = ("text_encoder", "temporal_prefill", "temporal_step", "spatial", "denoise", "place",
               "vae_decoder", "vae_encoder")

_ROOT = Path(__file__).resolve().parents[2]


# -------------------------------------------------------------------------------------------------
# Declarations
# -------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # a key of DTYPE_NAMES
    shape: tuple[int | str, ...]  # ints, or names of dynamic dims
    doc: str = ""

    def concrete(self, dims: dict[str, int]) -> tuple[int, ...]:
        """Sizes for given dynamic dims; a derived size is an expression of them, e.g. '4*window-3'."""
        return tuple(d if isinstance(d, int) else dims[d] if d in dims else int(eval(d, {"__builtins__": {}}, dims))
                     for d in self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPE_NAMES[self.dtype]


@dataclasses.dataclass(frozen=True)
class Dim:
    """A dynamic dimension and its range (TensorRT optimization profile: min / opt / max)."""

    name: str
    min: int
    opt: int
    max: int


@dataclasses.dataclass
class GraphSpec:
    name: str
    doc: str
    precision: str  # compute precision of the matrix work: fp32 | fp16 | bf16
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: dict[str, Dim]
    component: str | None  # checkpoint component whose weights it holds: transformer | text_encoder | vae
    weight_prefixes: tuple[str, ...]  # which of that component's tensors ("" = all)
    sources: tuple[str, ...]  # repository files whose code defines the graph (export code version)
    build: Callable[[], nn.Module]  # the torch module (loads weights on first use)
    sample: Callable[[dict[str, int], torch.Generator], dict[str, torch.Tensor]]
    notes: tuple[str, ...] = ()

    def dims_at(self, point: str) -> dict[str, int]:
        """Concrete dynamic dims at 'min', 'opt' or 'max' of their ranges."""
        return {name: getattr(dim, point) for name, dim in self.dims.items()}

    def export_dims(self) -> dict[str, int]:
        """Example sizes for tracing: >= 2 for every dynamic dim (torch.export specializes 0 and 1)."""
        return {name: min(dim.max, max(2, dim.opt)) for name, dim in self.dims.items()}

    def describe(self) -> dict[str, Any]:
        """JSON-able declaration (manifest and content key)."""
        tensors = lambda ts: [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in ts]  # noqa: E731
        return {"name": self.name, "precision": self.precision, "inputs": tensors(self.inputs),
                "outputs": tensors(self.outputs), "dims": {k: dataclasses.asdict(v) for k, v in self.dims.items()},
                "notes": list(self.notes)}


def _t(name: str, dtype: str, *shape: int | str, doc: str = "") -> TensorSpec:
    return TensorSpec(name, dtype, tuple(shape), doc)


def _dim(name: str, low: int, high: int, opt: int | None = None) -> Dim | None:
    """A dynamic dim, or None when the range is a single size (then the dim is static)."""
    return None if low == high else Dim(name, low, opt if opt is not None else high, high)


# -------------------------------------------------------------------------------------------------
# Checkpoint access (configs eagerly, weights on first use)
# -------------------------------------------------------------------------------------------------
class Checkpoint:
    """A NOVA checkpoint folder: configs now, modules (per precision) when a graph is built."""

    def __init__(self, folder: str | os.PathLike):
        from runtime import checkpoint
        from runtime.schedules import load_scheduler

        self.folder = Path(folder)
        checkpoint.model_index(self.folder)
        self.config = checkpoint.transformer_config(self.folder)
        self.text_config = checkpoint.read_json(self.folder / "text_encoder" / "config.json")
        self.vae_config = checkpoint.read_json(self.folder / "vae" / "config.json")
        self.scheduler = load_scheduler(self.folder / "scheduler")
        self._modules: dict[tuple[str, str], nn.Module] = {}

    @property
    def name(self) -> str:
        return self.folder.resolve().name

    @property
    def video_vae(self) -> bool:
        return self.vae_config.get("_class_name") == "AutoencoderKLOpenSora"

    def module(self, component: str, precision: str) -> nn.Module:
        from runtime import checkpoint

        key = (component, precision)
        if key not in self._modules:
            load = {"transformer": checkpoint.load_transformer, "text_encoder": checkpoint.load_text_encoder,
                    "vae": checkpoint.load_vae}[component]
            self._modules[key] = cast_module(load(self.folder, torch.float32), TORCH_DTYPES[precision])
        return self._modules[key]

    def release(self, component: str | None = None) -> None:
        """Forget loaded modules (all, or one component's) to free memory."""
        for key in [k for k in self._modules if component in (None, k[0])]:
            del self._modules[key]

    def config_dict(self, component: str | None) -> dict[str, Any]:
        return {"transformer": self.config.to_dict(), "text_encoder": self.text_config, "vae": self.vae_config,
                None: {}}[component]


# -------------------------------------------------------------------------------------------------
# Realistic random inputs
# -------------------------------------------------------------------------------------------------
def _randn(shape, generator, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=generator) * scale).to(dtype)


def _randint(low: int, high: int, shape, generator) -> torch.Tensor:
    return torch.randint(low, high, shape, generator=generator, dtype=torch.int64)


def _token_window(batch: int, num_tokens: int, count: int, generator) -> torch.Tensor:
    """Distinct ids per row: a cyclic window of a random order (what the runner passes)."""
    order = torch.stack([torch.randperm(num_tokens, generator=generator) for _ in range(batch)])
    first = int(_randint(0, num_tokens, (1,), generator))
    return order[:, (first + torch.arange(count)) % num_tokens]


# -------------------------------------------------------------------------------------------------
# The graphs of one build
# -------------------------------------------------------------------------------------------------
def _sources(*extra: str) -> tuple[str, ...]:
    base = ("runtime/graphs/modules.py", "runtime/graphs/specs.py", "runtime/graphs/profile.py")
    return base + extra


def build_specs(checkpoint: Checkpoint, profile: BuildProfile, precision: str = "fp32",
                overrides: dict[str, str] | None = None, backend: str = "onnxruntime") -> dict[str, GraphSpec]:
    """Every graph of `checkpoint` under `profile`, in build order."""
    g = Geometry.from_config(checkpoint.config, profile)
    unknown = sorted(set(overrides or {}) - set(GRAPH_NAMES))
    if unknown:
        raise ValueError(f"unknown graph name(s) in precision overrides: {', '.join(unknown)} "
                         f"(graphs: {', '.join(GRAPH_NAMES)})")
    prec = {name: component_precision(name, precision, overrides, backend) for name in GRAPH_NAMES}
    act = {name: COMPUTE_DTYPE_NAME[p] for name, p in prec.items()}
    B, M, N, Nv, D, C = g.batch, g.model_batch, g.num_tokens, g.num_video_tokens, g.width, g.channels
    h, w = g.latent_size
    n, td, L, H, Dh, Lmax = g.max_tokens_per_step, g.token_dim, g.video_depth, g.num_heads, g.head_dim, g.cache_length
    transformer_src = ("runtime/model/transformer.py", "runtime/model/config.py")
    specs: dict[str, GraphSpec] = {}

    def transformer(name: str) -> nn.Module:
        return checkpoint.module("transformer", prec[name])

    # -- text encoder ------------------------------------------------------------------------------
    text_dim = _dim("text_batch", 1, g.text_batch)
    P = "text_batch" if text_dim else g.text_batch
    vocab = min(int(checkpoint.text_config.get("vocab_size", 50257)), 50257)
    pad_id = int(checkpoint.text_config.get("pad_token_id") or 50256)

    def sample_text(dims, gen):
        rows = dims.get("text_batch", g.text_batch)
        ids = _randint(0, vocab, (rows, g.text_len), gen)
        lengths = _randint(1, g.text_len + 1, (rows,), gen)
        ids[torch.arange(g.text_len).view(1, -1) >= lengths.view(-1, 1)] = pad_id
        return {"input_ids": ids}

    specs["text_encoder"] = GraphSpec(
        name="text_encoder", precision=prec["text_encoder"],
        doc="Phi-2 over right-padded token ids (no mask: causal, so padding does not change real positions). "
            "Null-filling is done by temporal_prefill from the prompt lengths.",
        inputs=(_t("input_ids", "int64", P, g.text_len, doc="token ids, right-padded with the pad id"),),
        outputs=(_t("hidden", "float32", P, g.text_len, g.text_dim, doc="last_hidden_state"),),
        dims={d.name: d for d in [text_dim] if d}, component="text_encoder", weight_prefixes=("model.",),
        sources=_sources("runtime/model/text_encoder.py"),
        build=lambda: TextEncoderGraph(checkpoint.module("text_encoder", prec["text_encoder"]),
                                       TORCH_DTYPES[prec["text_encoder"]]).eval(),
        sample=sample_text)

    # -- temporal prefill (frame 0) ----------------------------------------------------------------
    prefill_inputs = [
        _t("text_hidden", "float32", M, g.text_len, g.text_dim, doc="Phi-2 features per CFG row"),
        _t("text_lengths", "int64", M, doc="real tokens per row; 0 = empty prompt (all null features)"),
        _t("frame_position", "float32", 1, doc="frame_position(0, T, base_t) = 0"),
    ]
    if g.has_motion:
        prefill_inputs.append(_t("motion_flow", "float32", M, doc="motion flow per row (default 5)"))
    prefill_outputs = [_t("indicator", act["temporal_prefill"], M, Nv, D, doc="spatial condition of frame 0 = anchor")]
    if g.video:
        prefill_outputs += [_t("k_cache", act["temporal_prefill"], L, M, H, Lmax, Dh, doc="[0, Lc + Nv) written"),
                            _t("v_cache", act["temporal_prefill"], L, M, H, Lmax, Dh)]

    def sample_prefill(dims, gen):
        lengths = _randint(0, g.text_len + 1, (M,), gen)
        lengths[-1] = 0  # an empty (negative) prompt
        out = {"text_hidden": _randn((M, g.text_len, g.text_dim), gen), "text_lengths": lengths,
               "frame_position": torch.zeros(1)}
        if g.has_motion:
            out["motion_flow"] = torch.rand(M, generator=gen) * 9 + 1
        return out

    specs["temporal_prefill"] = GraphSpec(
        name="temporal_prefill", precision=prec["temporal_prefill"],
        doc="Frame 0 of the temporal encoder: null-fill, text projection (+ motion tokens), BOS frame tokens "
            "with time and space embeddings, all blocks; writes the KV cache for videos.",
        inputs=tuple(prefill_inputs), outputs=tuple(prefill_outputs), dims={}, component="transformer",
        weight_prefixes=("text_embed.", "motion_embed.", "video_pos_embed.", "mask_embed.bos_token", "video_encoder."),
        sources=_sources(*transformer_src),
        build=lambda: TemporalPrefillGraph(transformer("temporal_prefill"), g,
                                           TORCH_DTYPES[prec["temporal_prefill"]]).eval(),
        sample=sample_prefill)

    # -- temporal step (frames t >= 1) -------------------------------------------------------------
    if g.video:
        step_dtype = act["temporal_step"]
        step_inputs = [
            _t("prev_latent", "float32", B, C, h, w, doc="latent frame t-1 (scaled)"),
            _t("frame_position", "float32", 1, doc="frame_position(t, T, base_t)"),
            _t("k_cache", step_dtype, L, M, H, Lmax, Dh),
            _t("v_cache", step_dtype, L, M, H, Lmax, Dh),
            _t("cache_length", "int64", 1, doc="valid positions before this frame: Lc + t * Nv"),
        ]
        if g.has_mixer:
            step_inputs.append(_t("anchor", step_dtype, M, Nv, D, doc="indicator of frame 0"))

        def sample_step(dims, gen):
            frame = int(_randint(1, g.max_latent_length, (1,), gen))
            length = g.condition_len + frame * Nv
            valid = (torch.arange(Lmax) < length).view(1, 1, 1, -1, 1)
            cache = lambda: (_randn((L, M, H, Lmax, Dh), gen) * valid).to(DTYPE_NAMES[step_dtype])  # noqa: E731
            out = {"prev_latent": _randn((B, C, h, w), gen),
                   "frame_position": torch.tensor(frame_position(frame, g.max_latent_length, g.base_t)),
                   "k_cache": cache(), "v_cache": cache(), "cache_length": torch.tensor([length])}
            if g.has_mixer:
                out["anchor"] = _randn((M, Nv, D), gen, DTYPE_NAMES[step_dtype])
            return out

        specs["temporal_step"] = GraphSpec(
            name="temporal_step", precision=prec["temporal_step"],
            doc="Frame t >= 1 of the temporal encoder over the static KV cache (ScatterElements write at "
                "cache_length, boolean key mask over the valid positions), then the scale/shift mixer with the "
                "anchor. Outputs are new buffers (ping-pong): do not bind an input buffer as an output.",
            inputs=tuple(step_inputs),
            outputs=(_t("indicator", step_dtype, M, Nv, D), _t("k_cache_out", step_dtype, L, M, H, Lmax, Dh),
                     _t("v_cache_out", step_dtype, L, M, H, Lmax, Dh)),
            dims={}, component="transformer", weight_prefixes=("video_pos_embed.", "video_encoder."),
            sources=_sources(*transformer_src),
            build=lambda: TemporalStepGraph(transformer("temporal_step"), g, TORCH_DTYPES[prec["temporal_step"]]).eval(),
            sample=sample_step)

    # -- spatial (per mask step) -------------------------------------------------------------------
    slots_dim = _dim("known_slots", g.known_bucket, g.max_known_slots,
                     opt=g.known_slots(g.max_known_slots // 2))
    K = "known_slots" if slots_dim else g.max_known_slots

    def sample_spatial(dims, gen):
        from runtime.model.transformer import unpatchify

        slots = dims.get("known_slots", g.max_known_slots)
        count = int(_randint(0, slots + 1, (1,), gen))
        order = torch.stack([torch.randperm(N, generator=gen) for _ in range(B)])
        unknown = torch.ones(B, N, td).scatter(1, order[:, :count, None].expand(-1, -1, td), 0)
        known_pixels = unpatchify(1 - unknown, g.patch, h, w)  # the canvas is 0 where unknown
        return {"canvas": known_pixels * _randn((B, C, h, w), gen), "known_ids": order[:, :slots],
                "known_count": torch.tensor([count]), "indicator": _randn((M, Nv, D), gen, DTYPE_NAMES[act["spatial"]]),
                "selected": order[:, (count + torch.arange(n)) % N]}

    specs["spatial"] = GraphSpec(
        name="spatial", precision=prec["spatial"],
        doc="One mask step of the spatial encoder: the encoder half on the known tokens (a bucketed number of "
            "slots under a key mask: exactly the official known-token gather), the decoder half on all tokens, "
            "then Z at the selected tokens.",
        inputs=(_t("canvas", "float32", B, C, h, w, doc="latent frame so far (0 at unknown tokens)"),
                _t("known_ids", "int64", B, K, doc="the token order's first K ids (Geometry.known_slots(k))"),
                _t("known_count", "int64", 1, doc="k: how many of known_ids are known (the rest are masked)"),
                _t("indicator", act["spatial"], M, Nv, D),
                _t("selected", "int64", B, n, doc="this step's token ids, padded with distinct ids")),
        outputs=(_t("z_selected", act["spatial"], M, n, D),),
        dims={d.name: d for d in [slots_dim] if d}, component="transformer",
        weight_prefixes=("mask_embed.mask_token", "image_encoder."),
        sources=_sources(*transformer_src),
        build=lambda: SpatialGraph(transformer("spatial"), g, TORCH_DTYPES[prec["spatial"]]).eval(),
        sample=sample_spatial,
        notes=(f"encoder half on known-token slots in buckets of {g.known_bucket} (N / 8 rounded up), "
               f"key-masked beyond k",))

    # -- denoise (one diffusion step) ----------------------------------------------------------------
    from runtime.schedules import SamplerTable, scheduler_config

    table = SamplerTable.from_config(scheduler_config(checkpoint.folder / "scheduler"), 25)
    clip = table.clip_range if table.clip_range is not None else NO_CLIP

    def sample_denoise(dims, gen):
        step = int(_randint(0, len(table.timesteps), (1,), gen))
        return {"x": _randn((B, n, td), gen), "z_selected": _randn((M, n, D), gen, DTYPE_NAMES[act["denoise"]]),
                "timestep": torch.from_numpy(table.timesteps[step:step + 1].copy()),
                "coefficients": torch.from_numpy(table.coefficients[step].copy()),
                "clip_range": torch.tensor([float(clip)]),
                "noise": _randn((B, n, td), gen),
                "guidance_scale": torch.rand(1, generator=gen) * 6 + 1.5}

    specs["denoise"] = GraphSpec(
        name="denoise", precision=prec["denoise"],
        doc="One diffusion step of the selected tokens: diffusion MLP on M rows, CFG mixing and the sampler "
            "update in fp32. Rows are independent, so padded rows are harmless.",
        inputs=(_t("x", "float32", B, n, td, doc="current sample of the selected tokens"),
                _t("z_selected", act["denoise"], M, n, D),
                _t("timestep", "float32", 1, doc="SamplerTable.timesteps[j]"),
                _t("coefficients", "float32", table.coefficients.shape[1],
                   doc="SamplerTable.coefficients[j]: a, b, r, c, d, e"),
                _t("clip_range", "float32", 1, doc=f"SamplerTable.clip_range, or {NO_CLIP:g} for none"),
                _t("noise", "float32", B, n, td, doc="initial noise rows at j = 0 go in x; here the step noise"),
                _t("guidance_scale", "float32", 1)),
        outputs=(_t("x_next", "float32", B, n, td),),
        dims={}, component="transformer", weight_prefixes=("image_decoder.",),
        sources=_sources(*transformer_src, "runtime/schedules.py"),
        build=lambda: DenoiseGraph(transformer("denoise"), g, TORCH_DTYPES[prec["denoise"]]).eval(),
        sample=sample_denoise)

    # -- place (end of a mask step) -------------------------------------------------------------------
    def sample_place(dims, gen):
        count = int(_randint(1, n + 1, (1,), gen))
        return {"canvas": _randn((B, C, h, w), gen), "x": _randn((B, n, td), gen),
                "selected": _token_window(B, N, n, gen), "valid": (torch.arange(n) < count).expand(B, -1).clone()}

    specs["place"] = GraphSpec(
        name="place", precision=prec["place"],
        doc="Adds the sampled tokens into the canvas (ScatterElements of distinct ids; padded rows write their "
            "old value back).",
        inputs=(_t("canvas", "float32", B, C, h, w), _t("x", "float32", B, n, td),
                _t("selected", "int64", B, n), _t("valid", "bool", B, n, doc="True for this step's real tokens")),
        outputs=(_t("canvas_out", "float32", B, C, h, w),),
        dims={}, component=None, weight_prefixes=(), sources=_sources(*transformer_src),
        build=lambda: PlaceGraph(g).eval(), sample=sample_place)

    # -- VAE ------------------------------------------------------------------------------------------
    vae_dim = _dim("vae_batch", 1, B, opt=1)
    VB = "vae_batch" if vae_dim else B
    H_px, W_px = g.image_size
    vae_src = ("runtime/model/vae.py", "runtime/model/vae_opensora.py")
    decoder_dims = {d.name: d for d in [vae_dim] if d}
    single = None
    if checkpoint.video_vae:
        # Windows of up to 5 latents (the runner tiles longer videos with stride 4). Window sizes 2..5 share
        # one graph with a dynamic time dim; a 1-latent request (an image from the video model) takes the
        # official code's other branch (no temporal upsampling) and has its own graph.
        largest = min(VIDEO_VAE_WINDOW, g.max_latent_length)
        window_dim = _dim("window", 2, largest) if largest >= 2 else None
        window = "window" if window_dim else largest
        if window_dim:
            decoder_dims[window_dim.name] = window_dim
        frames = "4*window-3" if window_dim else 1 + 4 * (largest - 1)
        latents = _t("latents", "float32", VB, C, window, h, w,
                     doc=f"one temporal window of {'2..' if window_dim else ''}{largest} scaled latents")
        pixels = _t("pixels", "uint8", VB, frames, H_px, W_px, 3, doc="1 + 4 (window - 1) frames")
        if largest >= 2:
            single = (_t("latents", "float32", VB, C, 1, h, w, doc="a 1-latent video (one image)"),
                      _t("pixels", "uint8", VB, 1, H_px, W_px, 3))
    else:
        latents = _t("latents", "float32", VB, C, h, w, doc="scaled latents")
        pixels = _t("pixels", "uint8", VB, H_px, W_px, 3)

    def decoder(name: str, inputs: TensorSpec, outputs: TensorSpec, dims: dict[str, Dim]) -> GraphSpec:
        def sample(values, gen):
            return {"latents": _randn(inputs.concrete(values), gen)}

        return GraphSpec(
            name=name, precision=prec["vae_decoder"],
            doc="Unscale, decode, x * 127.5 + 127.5, clamp, truncate to uint8 (channels last).",
            inputs=(inputs,), outputs=(outputs,), dims=dims, component="vae",
            weight_prefixes=("decoder.", "post_quant_conv."), sources=_sources(*vae_src),
            build=lambda: VAEDecoderGraph(checkpoint.module("vae", prec["vae_decoder"]),
                                          TORCH_DTYPES[prec["vae_decoder"]]).eval(),
            sample=sample)

    specs["vae_decoder"] = decoder("vae_decoder", latents, pixels, decoder_dims)
    if single:
        specs["vae_decoder_single"] = decoder("vae_decoder_single", *single, {d.name: d for d in [vae_dim] if d})

    if checkpoint.video_vae and g.video and profile.image_to_video:
        def sample_encoder(dims, gen):
            image = torch.randint(0, 256, (1, H_px, W_px, 3), generator=gen, dtype=torch.uint8)
            return {"image": image, "noise": _randn((1, C, h, w), gen)}

        specs["vae_encoder"] = GraphSpec(
            name="vae_encoder", precision=prec["vae_encoder"],
            doc="Image-to-video: uint8 image -> scaled posterior sample noise * std + mean (noise from the host).",
            inputs=(_t("image", "uint8", 1, H_px, W_px, 3), _t("noise", "float32", 1, C, h, w)),
            outputs=(_t("latent", "float32", 1, C, h, w),), dims={}, component="vae",
            weight_prefixes=("encoder.", "quant_conv."), sources=_sources(*vae_src),
            build=lambda: VAEEncoderGraph(checkpoint.module("vae", prec["vae_encoder"]),
                                          TORCH_DTYPES[prec["vae_encoder"]]).eval(),
            sample=sample_encoder)
    return specs


def run_module(spec: GraphSpec, module: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Call a graph's module with named inputs; -> named outputs (the torch backend's one call)."""
    with torch.no_grad():
        result = module(**{t.name: inputs[t.name] for t in spec.inputs})
    result = result if isinstance(result, tuple) else (result,)
    return {t.name: value for t, value in zip(spec.outputs, result)}


def describe_all(specs: dict[str, GraphSpec]) -> str:
    return json.dumps({name: spec.describe() for name, spec in specs.items()}, indent=2)
