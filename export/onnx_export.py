"""Export one graph declaration (`runtime.graphs.GraphSpec`) to ONNX.

The file layout is always `<name>.onnx` + `<name>.onnx.data` (all weights as external data in
one file beside the graph, so graphs above 2 GB work and ONNX Runtime / TensorRT's parser resolve
the weights relative to the model path). Both exporters are supported:

- `dynamo` (torch.export, the default of torch.onnx.export since torch 2.9): measured on these
  graphs, see engines/README.md;
- `torchscript` (deprecated tracer, opset <= 20).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
import onnx_ir as ir
from onnx_ir.passes.common import DeduplicateHashedInitializersPass

from export.attention import translation_table as attention_translations
from export.convolution import translation_table as conv3d_translations
from runtime.graphs.contract import GraphSpec

EXPORTERS = ("dynamo", "torchscript")
DEFAULT_EXPORTER = "dynamo"
OPSET = 20  # LayerNormalization stays one op (>= 17); SDPA decomposes to MatMul/Softmax for every backend
ONNX_DTYPES = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16,
               "bfloat16": onnx.TensorProto.BFLOAT16, "int64": onnx.TensorProto.INT64,
               "uint8": onnx.TensorProto.UINT8, "bool": onnx.TensorProto.BOOL}


class ExportError(RuntimeError):
    """A graph could not be exported, or the exported graph does not match its declaration."""


def example_inputs(spec: GraphSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    """Tracing inputs: every dynamic dim >= 2, every tensor a distinct object (dynamo merges shared ones)."""
    inputs = spec.sample(spec.export_dims(), torch.Generator().manual_seed(seed))
    return {name: tensor.clone() for name, tensor in inputs.items()}


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and warnings per graph; keep the build's output readable."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript",
                                              "torch.fx.experimental.symbolic_shapes", "torch._export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


class _ByName(torch.nn.Module):
    """The graph module called with its declared inputs by name. Exporters pass inputs by position, and a
    module's optional inputs (motion_flow, anchor, raw_bos) are declared only where a checkpoint or build has
    them, so positions alone would bind one to another's parameter."""

    def __init__(self, module: torch.nn.Module, names: list[str]):
        super().__init__()
        self.module, self.names = module, names

    def forward(self, *inputs: torch.Tensor):
        return self.module(**dict(zip(self.names, inputs)))


def export_graph(spec: GraphSpec, module: torch.nn.Module, path: str | os.PathLike, exporter: str = DEFAULT_EXPORTER,
                 opset: int = OPSET) -> dict[str, Any]:
    """Write `path` (+ `path`.data) for `spec` traced from `module`. -> info (exporter, seconds)."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    if exporter != "dynamo" and _translations(spec):  # the declared forms are made by dynamo's custom translations
        raise ExportError(f"graph {spec.name!r} declares attention {spec.attention!r} and 3-D convolutions "
                          f"{spec.conv3d!r}, whose non-standard forms only the dynamo exporter writes")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    inputs = example_inputs(spec)
    args = tuple(inputs[t.name] for t in spec.inputs)
    input_names = [t.name for t in spec.inputs]
    output_names = [t.name for t in spec.outputs]
    module = _ByName(module, input_names)
    scratch = Path(tempfile.mkdtemp(prefix=f".export-{spec.name}-", dir=path.parent))
    raw = scratch / path.name  # exporters may write extra weight files: keep them in a scratch folder
    start = time.perf_counter()
    try:
        with torch.no_grad(), _quiet():
            if exporter == "dynamo":
                dims = {name: torch.export.Dim(name, min=d.min, max=d.max) for name, d in spec.dims.items()}
                shapes = tuple({axis: dims[s] for axis, s in t.dynamic_axes.items()} or None for t in spec.inputs)
                torch.onnx.export(module, args, str(raw), input_names=input_names, output_names=output_names,
                                  dynamic_shapes={"inputs": shapes} if spec.dims else None, dynamo=True, external_data=True,
                                  opset_version=opset, optimize=True, verbose=False,
                                  custom_translation_table=_translations(spec))
            else:
                axes = {t.name: t.dynamic_axes for t in (*spec.inputs, *spec.outputs)}
                torch.onnx.export(module, args, str(raw), input_names=input_names, output_names=output_names,
                                  dynamic_axes={k: v for k, v in axes.items() if v} or None, dynamo=False,
                                  opset_version=min(opset, 20), do_constant_folding=True)
    except Exception as error:  # the exporters raise many types; keep the cause, add the graph's name
        raise ExportError(f"exporting graph {spec.name!r} with the {exporter} exporter failed: "
                          f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}") from error
    else:
        exported = time.perf_counter()
        _deduplicate_weights(raw)
        _relayout(raw, path)
        _declare_output_shapes(spec, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    check_declaration(spec, path)
    return {"exporter": exporter, "opset": opset, "export_seconds": round(exported - start, 3),
            "total_seconds": round(time.perf_counter() - start, 3)}


def export_forms(backend: str, exporter: str) -> dict[str, str]:
    """The operator forms a build's graphs are exported in (`GraphSpec.attention` and `.conv3d`): ONNX Runtime's
    (its fused attention op, video convolutions as 2-D ones over the frames) for ONNX Runtime engines exported
    by dynamo, whose custom translations make them; the standard ONNX forms for TensorRT's parser and
    TorchScript builds."""
    onnxruntime = backend == "onnxruntime" and exporter == "dynamo"
    return {"attention": "ort-mha" if onnxruntime else "standard", "conv3d": "frames" if onnxruntime else "native"}


def _translations(spec: GraphSpec) -> dict | None:
    """The dynamo exporter's custom translations for the graph's declared attention and 3-D convolution forms."""
    table = {**(attention_translations(spec.attention) or {}), **(conv3d_translations(spec.conv3d) or {})}
    return table or None


def _deduplicate_weights(raw: Path) -> None:
    """Keep one initializer per distinct content. Constant folding gives each use of a weight its own folded
    copy (a Linear's transposed weight), so a graph that calls a module several times (denoise_loop's
    unrolled diffusion steps) would store that module's weights once per call. Re-saved only when changed."""
    model = ir.load(str(raw))  # weights memory-mapped from the external data, hashed one at a time
    if not DeduplicateHashedInitializersPass()(model).modified:
        return
    folder = raw.parent / "deduplicated"  # the same file names: the graph records its data file's name
    folder.mkdir()
    ir.save(model, str(folder / raw.name), external_data=raw.name + ".data")
    del model  # release the memory map of the old data before replacing it
    for file in folder.iterdir():
        file.replace(raw.parent / file.name)
    folder.rmdir()


def _declare_output_shapes(spec: GraphSpec, path: Path) -> None:
    """Write the declared output shapes into the graph: the TorchScript exporter leaves every output dim it cannot
    prove static symbolic (spatial's z_selected, the KV cache), and a backend binds fixed output buffers (CUDA
    graphs) only for outputs whose graph shape is static. The dynamo exporter already writes them; re-saved only
    when changed (the graph without its weights)."""
    model = onnx.load(str(path), load_external_data=False)
    changed = False
    for declared, value in zip(spec.outputs, model.graph.output):
        for d, s in zip(value.type.tensor_type.shape.dim, declared.shape):
            if isinstance(s, int) and d.dim_value != s:
                d.dim_value, changed = s, True  # one of dim_value / dim_param: setting one clears the other
            elif isinstance(s, str) and d.dim_param != s:
                d.dim_param, changed = s, True
    if changed:
        onnx.save_model(model, str(path))


def _relayout(raw: Path, path: Path) -> None:
    """Move `raw` to path + path.data, re-saving it only when the exporter chose another layout
    (the dynamo exporter already writes <name>.onnx + <name>.onnx.data; re-saving would hold all
    weights in memory once more, which matters for multi-GB graphs)."""
    data = path.with_name(path.name + ".data")
    for stale in (path, data):
        stale.unlink(missing_ok=True)
    written = {f.name for f in raw.parent.iterdir()}
    if written == {raw.name, raw.name + ".data"}:
        raw.replace(path)
        raw.with_name(raw.name + ".data").replace(data)
        return
    model = onnx.load(str(raw), load_external_data=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)  # small constants (shapes) stay inline
    if not data.exists():  # a graph without weights: keep the two-file layout anyway
        data.write_bytes(b"")


def check_declaration(spec: GraphSpec, path: str | os.PathLike) -> None:
    """The exported graph's inputs/outputs are the declared ones: names, order, dtypes, ranks, static sizes."""
    onnx.checker.check_model(str(path))
    model = onnx.load(str(path), load_external_data=False)
    problems = []
    for kind, declared, actual in (("input", spec.inputs, model.graph.input), ("output", spec.outputs, model.graph.output)):
        names = [v.name for v in actual]
        if names != [t.name for t in declared]:
            problems.append(f"{kind}s are {names}, declared {[t.name for t in declared]}")
            continue
        for t, v in zip(declared, actual):
            tensor = v.type.tensor_type
            if tensor.elem_type != ONNX_DTYPES[t.dtype]:
                problems.append(f"{kind} {t.name} has dtype {onnx.TensorProto.DataType.Name(tensor.elem_type)}, "
                                f"declared {t.dtype}")
            dims = tensor.shape.dim
            if len(dims) != len(t.shape):
                problems.append(f"{kind} {t.name} has rank {len(dims)}, declared {len(t.shape)}")
                continue
            for axis, (d, s) in enumerate(zip(dims, t.shape)):
                if isinstance(s, int) and d.HasField("dim_value") and d.dim_value != s:
                    problems.append(f"{kind} {t.name} axis {axis} is {d.dim_value}, declared {s}")
                if isinstance(s, str) and d.HasField("dim_value"):
                    problems.append(f"{kind} {t.name} axis {axis} is static {d.dim_value}, declared dynamic {s}")
    fused = sum(node.op_type == "MultiHeadAttention" for node in model.graph.node)
    if spec.attention == "ort-mha" and (not fused or any(node.op_type == "Softmax" for node in model.graph.node)):
        problems.append(f"declares ort-mha attention, but has {fused} MultiHeadAttention node(s) and Softmax left")
    elif spec.attention != "ort-mha" and fused:
        problems.append(f"declares {spec.attention} attention, but has {fused} MultiHeadAttention node(s)")
    left = _time_convolutions(model) if spec.conv3d == "frames" else 0
    if left:
        problems.append(f"declares frames 3-D convolutions, but has {left} 5-D Conv(s) of stride 1 in time left")
    if problems:
        raise ExportError(f"exported graph {spec.name!r} does not match its declaration: " + "; ".join(problems))


def _time_convolutions(model: onnx.ModelProto) -> int:
    """How many Convs have a 5-D weight (3-D convolutions) and stride 1 in time."""
    ranks = {t.name: len(t.dims) for t in model.graph.initializer}
    inferred = onnx.shape_inference.infer_shapes(model).graph
    ranks.update({v.name: len(v.type.tensor_type.shape.dim) for v in inferred.value_info})
    strides = lambda node: next((list(a.ints) for a in node.attribute if a.name == "strides"), [1])  # noqa: E731
    return sum(node.op_type == "Conv" and ranks.get(node.input[1]) == 5 and strides(node)[0] == 1
               for node in model.graph.node)


def graph_dtypes(path: str | os.PathLike) -> dict[str, int]:
    """Element type -> count over the graph's initializers and typed values (for precision audits)."""
    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for init in model.graph.initializer:
        name = onnx.TensorProto.DataType.Name(init.data_type)
        counts[name] = counts.get(name, 0) + 1
    return counts
