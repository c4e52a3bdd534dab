"""Every graph of a build, in build order: one declaration function per graph, registered below.

Export, validation, the engine build and the runner all read these declarations, so the names,
dtypes and shapes are the runner's contract (`runtime.graphs.contract`). Each graph's module, its
declaration and its sample inputs sit together in the graph's file:

    graph                                  file
    text_encoder                           runtime/graphs/text_encoder.py
    temporal_prefill, temporal_step        runtime/graphs/temporal.py
    spatial                                runtime/graphs/spatial.py
    denoise, place, denoise_loop           runtime/graphs/denoise.py
    vae_decoder(_single), vae_encoder      runtime/graphs/vae.py

    specs = build_specs(CheckpointConfigs.read(folder), BuildProfile(), precision="fp16")
    spec = specs["spatial"]
    module = spec.build()                      # runtime.graphs.spatial.SpatialGraph
    inputs = spec.sample(spec.dims_at("opt"), torch.Generator().manual_seed(0))
    outputs = module(**inputs)
"""

from __future__ import annotations

from typing import Callable

from runtime.configs import CheckpointConfigs
from runtime.graphs.common import ModuleCache
from runtime.graphs.contract import ATTENTION_FORMS, CONV3D_FORMS, GraphContext, GraphSpec
from runtime.graphs.denoise import denoise_loop_spec, denoise_spec, place_spec
from runtime.graphs.profile import BuildProfile, Geometry, component_precision
from runtime.graphs.spatial import spatial_spec
from runtime.graphs.temporal import temporal_prefill_spec, temporal_step_spec
from runtime.graphs.text_encoder import text_encoder_spec
from runtime.graphs.vae import vae_decoder_single_spec, vae_decoder_spec, vae_encoder_spec

# graph name -> its declaration (None where a checkpoint or profile has no such graph), in build order
GRAPHS: dict[str, Callable[[GraphContext], GraphSpec | None]] = {
    "text_encoder": text_encoder_spec,
    "temporal_prefill": temporal_prefill_spec,
    "temporal_step": temporal_step_spec,
    "spatial": spatial_spec,
    "denoise": denoise_spec,
    "place": place_spec,
    "denoise_loop": denoise_loop_spec,
    "vae_decoder": vae_decoder_spec,
    "vae_decoder_single": vae_decoder_single_spec,
    "vae_encoder": vae_encoder_spec,
}
# graphs whose precision a build may override; these follow another graph's (the loop must compute what
# its single steps compute, and the single-latent decoder what vae_decoder does)
FOLLOWS = {"denoise_loop": "denoise", "vae_decoder_single": "vae_decoder"}
GRAPH_NAMES = tuple(name for name in GRAPHS if name not in FOLLOWS)


def build_specs(configs: CheckpointConfigs, profile: BuildProfile, precision: str = "fp32",
                overrides: dict[str, str] | None = None, backend: str = "onnxruntime",
                modules: ModuleCache | None = None, attention: str = "standard",
                conv3d: str = "native") -> dict[str, GraphSpec]:
    """Every graph of a checkpoint under `profile`, in build order. `modules` supplies the weights on
    first use of a graph's module (a fresh cache of the checkpoint's modules by default); `attention` and
    `conv3d`: the forms the graphs with attention and 3-D convolutions are exported in (`ATTENTION_FORMS`,
    `CONV3D_FORMS`; `export.onnx_export.export_forms` chooses them per build)."""
    for kind, form, forms in (("attention", attention, ATTENTION_FORMS), ("conv3d", conv3d, CONV3D_FORMS)):
        if form not in forms:
            raise ValueError(f"{kind} form must be one of {', '.join(forms)}, got {form!r}")
    unknown = sorted(set(overrides or {}) - set(GRAPH_NAMES))
    if unknown:
        raise ValueError(f"unknown graph name(s) in precision overrides: {', '.join(unknown)} "
                         f"(graphs: {', '.join(GRAPH_NAMES)})")
    precisions = {name: component_precision(name, precision, overrides, backend) for name in GRAPH_NAMES}
    precisions.update({name: precisions[leader] for name, leader in FOLLOWS.items()})
    ctx = GraphContext(configs, modules or ModuleCache(configs.folder), profile,
                       Geometry.from_config(configs.transformer, profile), precisions, attention, conv3d)
    specs = {name: declare(ctx) for name, declare in GRAPHS.items()}
    return {name: spec for name, spec in specs.items() if spec is not None}
