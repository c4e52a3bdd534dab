"""Graph declarations and their torch modules: the contract shared by export, engines and the runner.

`profile` (build profile, geometry, precision policy) is torch-free; the declarations (`specs`,
`contract`) and the graph modules need torch, so they load on first use of their names.
"""

from runtime.graphs.profile import (NO_CLIP, POLICY, PRECISIONS, VIDEO_VAE_WINDOW, BuildProfile, Geometry,
                                    component_precision, frame_position)

_SPECS = {"GRAPH_NAMES": "specs", "build_specs": "specs", "Dim": "contract", "GraphSpec": "contract",
          "TensorSpec": "contract", "run_module": "contract"}

__all__ = ["NO_CLIP", "POLICY", "PRECISIONS", "VIDEO_VAE_WINDOW", "BuildProfile", "Geometry", "component_precision",
           "frame_position", *_SPECS]


def __getattr__(name: str):
    if name in _SPECS:
        import importlib

        return getattr(importlib.import_module(f"runtime.graphs.{_SPECS[name]}"), name)
    raise AttributeError(f"module 'runtime.graphs' has no attribute {name!r}")
