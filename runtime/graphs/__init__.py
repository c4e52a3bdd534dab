"""Graph declarations and their torch modules: the contract shared by export, engines and the runner.

`profile` (build profile, geometry, precision policy) is torch-free; `specs` and `modules` need torch,
so they load on first use of their names.
"""

from runtime.graphs.profile import (NO_CLIP, POLICY, PRECISIONS, VIDEO_VAE_WINDOW, BuildProfile, Geometry,
                                    component_precision, frame_position)

_SPECS = ("GRAPH_NAMES", "Checkpoint", "Dim", "GraphSpec", "TensorSpec", "build_specs", "run_module")

__all__ = ["NO_CLIP", "POLICY", "PRECISIONS", "VIDEO_VAE_WINDOW", "BuildProfile", "Geometry", "component_precision",
           "frame_position", *_SPECS]


def __getattr__(name: str):
    if name in _SPECS:
        from runtime.graphs import specs

        return getattr(specs, name)
    raise AttributeError(f"module 'runtime.graphs' has no attribute {name!r}")
