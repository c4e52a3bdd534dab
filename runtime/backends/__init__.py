"""Backends run named graphs on named inputs; the runner's loops are the same for all of them.

    torch         the graphs' PyTorch modules (runtime/graphs/), CPU or CUDA
    onnxruntime   the exported ONNX graphs in ONNX Runtime (CPU EP; CUDA EP with onnxruntime-gpu)
    tensorrt      TensorRT plans over CUDA buffers (needs `tensorrt` and `cuda-python`)

On a GPU all three replay CUDA graphs for their static-shape graphs (cuda_graphs.py: the shared host logic).
"""

from runtime.backends.base import Backend, BackendUnavailable

BACKENDS = ("torch", "onnxruntime", "tensorrt")

__all__ = ["BACKENDS", "Backend", "BackendUnavailable"]
