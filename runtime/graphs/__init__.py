"""Graph declarations and their torch modules: the contract shared by export, engines and the runner."""

from runtime.graphs.profile import POLICY, PRECISIONS, BuildProfile, Geometry, component_precision
from runtime.graphs.specs import (GRAPH_NAMES, NO_CLIP, Checkpoint, Dim, GraphSpec, TensorSpec, build_specs,
                                  frame_position, run_module)

__all__ = ["POLICY", "PRECISIONS", "BuildProfile", "Geometry", "component_precision", "GRAPH_NAMES", "NO_CLIP",
           "Checkpoint", "Dim", "GraphSpec", "TensorSpec", "build_specs", "frame_position", "run_module"]
