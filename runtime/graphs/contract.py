"""The contract of a compiled graph: its declaration (`GraphSpec`), shared by export, validation, the
engine build and every backend, and the context every graph's declaration is made from.

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

import ast
import dataclasses
import operator
from typing import Any, Callable

import torch
from torch import nn

from runtime.configs import CheckpointConfigs
from runtime.graphs.profile import PRECISION_DTYPES, BuildProfile, Geometry
from runtime.sources import reachable_files


_SIZE_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def size_expression(text: str) -> ast.expr:
    """A shape entry that is not an int: a dynamic dim's name, or an expression of names and integers with
    +, - and * (e.g. '4*window-3'); -> its syntax tree. Anything else is refused."""
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError:
        tree = None
    allowed = (ast.BinOp, ast.Name, ast.Load, *_SIZE_OPERATORS)
    if tree is None or not all(isinstance(n, allowed) or (isinstance(n, ast.Constant) and type(n.value) is int)
                               for n in ast.walk(tree)):
        raise ValueError(f"shape entry {text!r} is not a dim name or an expression of names and integers "
                         f"with +, - and *")
    return tree


def _size(node: ast.expr, dims: dict[str, int], text: str) -> int:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in dims:
            raise ValueError(f"shape entry {text!r} needs dim {node.id!r}; given {', '.join(dims) or 'none'}")
        return dims[node.id]
    return _SIZE_OPERATORS[type(node.op)](_size(node.left, dims, text), _size(node.right, dims, text))


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # a torch dtype's name: float32, float16, bfloat16, int64, uint8, bool
    shape: tuple[int | str, ...]  # ints, names of dynamic dims, or expressions of them (`size_expression`)

    def __post_init__(self):
        for entry in self.shape:
            if isinstance(entry, str):
                size_expression(entry)  # refused at declaration, not at first use

    @property
    def dynamic_axes(self) -> dict[int, str]:
        """axis -> its dynamic dim's name (or expression), for the axes that are not fixed sizes."""
        return {axis: d for axis, d in enumerate(self.shape) if isinstance(d, str)}

    def concrete(self, dims: dict[str, int]) -> tuple[int, ...]:
        """Sizes for given dynamic dims."""
        return tuple(d if isinstance(d, int) else _size(size_expression(d), dims, d) for d in self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def tensor(name: str, dtype: str, *shape: int | str) -> TensorSpec:
    return TensorSpec(name, dtype, tuple(shape))


@dataclasses.dataclass(frozen=True)
class Dim:
    """A dynamic dimension and its range (TensorRT optimization profile: min / opt / max)."""

    name: str
    min: int
    opt: int
    max: int


def dynamic(name: str, low: int, high: int, opt: int | None = None) -> dict[str, Dim]:
    """{name: Dim} for a dynamic dim, or {} when the range is a single size (then the dim is static)."""
    return {} if low == high else {name: Dim(name, low, opt if opt is not None else high, high)}


# How an exported graph spells attention (export/attention.py makes them): `standard` MatMul / Softmax ops, or
# ONNX Runtime's fused `com.microsoft.MultiHeadAttention` (`ort-mha`).
ATTENTION_FORMS = ("standard", "ort-mha")
# How it spells 3-D convolutions (export/convolution.py): `native` 5-D Convs, or `frames`: a 2-D Conv over the
# frames with the time taps stacked as channels.
CONV3D_FORMS = ("native", "frames")

Sample = Callable[[dict[str, int], torch.Generator], dict[str, torch.Tensor]]


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
    sample: Sample  # realistic random inputs at given dynamic dims
    notes: tuple[str, ...] = ()
    attention: str | None = None  # how its ONNX export computes attention (export/attention.py); None: none
    conv3d: str | None = None  # how it computes 3-D convolutions (export/convolution.py); None: none

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
                "attention": self.attention, "conv3d": self.conv3d, "notes": list(self.notes)}


def run_module(spec: GraphSpec, module: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Call a graph's module with named inputs; -> named outputs (the torch backend's one call)."""
    with torch.no_grad():
        result = module(**{t.name: inputs[t.name] for t in spec.inputs})
    result = result if isinstance(result, tuple) else (result,)
    return {t.name: value for t, value in zip(spec.outputs, result)}


@dataclasses.dataclass
class GraphContext:
    """What a graph's declaration is made from: the checkpoint's configs, its modules (loaded on first
    use), the build profile with the geometry it gives, and each graph's compute precision."""

    configs: CheckpointConfigs
    modules: Callable[[str, str], nn.Module]  # (component, precision) -> the checkpoint's module, cast
    profile: BuildProfile
    geometry: Geometry
    precisions: dict[str, str]  # graph name -> fp32 | fp16 | bf16
    attention: str = "standard"  # the attention form of this build's graphs that have attention
    conv3d: str = "native"  # the 3-D convolution form of this build's graphs that have 3-D convolutions

    def dtype_name(self, graph: str) -> str:
        """The graph's compute dtype as a TensorSpec dtype (float16, ...)."""
        return PRECISION_DTYPES[self.precisions[graph]]

    def dtype(self, graph: str) -> torch.dtype:
        return getattr(torch, self.dtype_name(graph))

    def module(self, component: str, graph: str) -> nn.Module:
        """The checkpoint's `component` module at `graph`'s precision."""
        return self.modules(component, self.precisions[graph])


def sources(module: str) -> tuple[str, ...]:
    """The files whose code defines a graph declared in `module`: its own and all it imports (read from the
    source, `runtime.sources`), so no list of paths can miss a dependency."""
    return reachable_files(module)


# -------------------------------------------------------------------------------------------------
# Realistic random inputs (the sample functions beside each graph use these)
# -------------------------------------------------------------------------------------------------
def randn(shape, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=generator).to(dtype)


def randint(low: int, high: int, shape, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(low, high, shape, generator=generator, dtype=torch.int64)


def random_orders(batch: int, num_tokens: int, generator: torch.Generator) -> torch.Tensor:
    """A random token order per row [batch, num_tokens]."""
    return torch.stack([torch.randperm(num_tokens, generator=generator) for _ in range(batch)])
