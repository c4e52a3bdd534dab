"""What every graph module shares: the precision policy inside a graph, the checkpoint's modules per
precision, and the small pieces of NOVA math more than one graph needs.

The graph modules are thin wrappers over the NOVA modules (no copy of model code): each computes
exactly one declared graph, taking its inputs by name and returning its outputs. They are what the
exporter traces and what the torch backend calls, so both run the same code.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from runtime.graphs.profile import PRECISION_DTYPES
from runtime.model.transformer import NOVATransformer3DModel, sincos_1d

NORM_MODULES = (nn.LayerNorm, nn.GroupNorm)


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


class ModuleCache:
    """A checkpoint's modules, loaded on first use and cast per precision (graphs of one build share them)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._modules: dict[tuple[str, str], nn.Module] = {}

    def __call__(self, component: str, precision: str) -> nn.Module:
        from runtime import checkpoint

        key = (component, precision)
        if key not in self._modules:
            load = {"transformer": checkpoint.load_transformer, "text_encoder": checkpoint.load_text_encoder,
                    "vae": checkpoint.load_vae}[component]
            self._modules[key] = cast_module(load(self.folder, torch.float32), getattr(torch, PRECISION_DTYPES[precision]))
        return self._modules[key]

    def release(self, component: str) -> None:
        """Forget one component's loaded modules to free memory."""
        for key in [k for k in self._modules if k[0] == component]:
            del self._modules[key]


class GraphModule(nn.Module):
    """Base of the graph modules: `compute_dtype` is the graph's matrix precision."""

    def __init__(self, compute_dtype: torch.dtype):
        super().__init__()
        self.compute_dtype = compute_dtype

    def islands(self):
        return fp32_islands(self.compute_dtype)


def cfg_rows(x: torch.Tensor, blocks: int) -> torch.Tensor:
    """Guidance batch layout: a B-row input repeated over the `blocks` row blocks (cond, uncond, third)."""
    return torch.cat([x] * blocks) if blocks > 1 else x


def time_embedding(model: NOVATransformer3DModel, position: torch.Tensor) -> torch.Tensor:
    """VideoPosEmbed of one frame position ([1] float32) -> [1, D] (same ops as VideoPosEmbed.forward)."""
    embed = model.video_pos_embed
    return embed.norm(embed.time_proj(sincos_1d(position).to(embed.time_proj[0].weight.dtype)))
