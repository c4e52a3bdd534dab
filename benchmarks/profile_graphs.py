"""Where a graph's time goes, by operator: ONNX Runtime's node profile against torch's profiler on the
same graph module and the same inputs (CPU), and with --compile the module through torch.compile as the
torch backend's `compile=True` runs it (inductor).

    python benchmarks/profile_graphs.py --engines engines/bench-mid-t2i-fp32 --graphs spatial,denoise --compile

The latency report says which stage dominates and how far its FLOP rate is from the matmul ceiling;
this says which operators take the time inside one graph (matrix products, attention softmax and
masking, norms, activations, data movement), per call, for each execution of the graph.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

CATEGORIES = [  # (category, substrings of ONNX op types / aten op names), first match wins
    ("matmul", ("MatMul", "Gemm", "FusedMatMul", "aten::addmm", "aten::mm", "aten::bmm", "aten::matmul",
                "aten::linear", "aten::baddbmm", "Conv", "aten::convolution", "aten::_convolution",
                "aten::mkldnn_convolution", "aten::conv", "mkl::_mkl_linear", "mkldnn::_linear_pointwise",
                "mkldnn::_convolution_pointwise")),
    ("attention (sdpa/softmax/mask)", ("MultiHeadAttention", "Softmax", "aten::_softmax", "aten::softmax",
                                       "scaled_dot_product", "aten::_safe_softmax", "aten::masked_fill",
                                       "aten::logical_not")),
    ("norm", ("LayerNorm", "Normalization", "aten::native_layer_norm", "aten::layer_norm", "aten::group_norm",
              "aten::native_group_norm", "ReduceMean", "Sqrt", "Pow")),
    ("activation", ("Gelu", "Erf", "Sigmoid", "Silu", "aten::gelu", "aten::silu", "Tanh")),
    ("data movement", ("Transpose", "Reshape", "Concat", "Gather", "Scatter", "Slice", "Split", "Expand",
                       "Where", "Unsqueeze", "Squeeze", "Cast", "Shape", "Identity", "aten::copy_", "aten::cat",
                       "aten::gather", "aten::scatter", "aten::where", "aten::contiguous", "aten::clone",
                       "aten::to", "aten::_to_copy", "aten::index", "aten::expand", "aten::reshape",
                       "aten::permute", "aten::transpose", "aten::view", "aten::split", "aten::chunk",
                       "aten::narrow", "aten::slice", "aten::empty", "aten::zeros", "aten::full",
                       "aten::ones", "aten::fill_")),
    # inductor's generated kernels (norms, activations, adds, copies fused) run inside its graph's call
    ("fused (inductor kernels)", ("CompiledFxGraph",)),
    ("compiled-code entry (guards, wrappers)", ("TorchDynamo", "Torch-Compiled Region", "Pregraph bytecode",
                                                "AOTDispatcher")),
]


def category(name: str) -> str:
    for label, keys in CATEGORIES:
        if any(k in name for k in keys):
            return label
    return "elementwise/other"


def profile_ort(path: Path, inputs: dict[str, Any], runs: int, threads: int) -> dict[str, Any]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    feeds = {k: v for k, v in inputs.items() if k in names}
    session.run(None, feeds)  # warm-up
    start = time.perf_counter()
    for _ in range(runs):
        session.run(None, feeds)
    wall = (time.perf_counter() - start) / runs
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session.run(None, feeds)
    for _ in range(runs):
        session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    per_op: dict[str, float] = defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            per_op[event["args"].get("op_name", "?")] += event["dur"] / 1e6
    per_op = {k: v / (runs + 1) for k, v in per_op.items()}
    return {"wall_per_call_s": wall, "per_op_s": dict(sorted(per_op.items(), key=lambda kv: -kv[1]))}


def profile_torch(module, spec, inputs: dict[str, Any], runs: int) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from runtime.graphs.contract import run_module

    tensors = {k: torch.from_numpy(v) if hasattr(v, "dtype") and not torch.is_tensor(v) else v
               for k, v in inputs.items()}
    start = time.perf_counter()
    run_module(spec, module, tensors)  # warm-up (a compiled module compiles here)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(runs):
        run_module(spec, module, tensors)
    wall = (time.perf_counter() - start) / runs
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(runs):
            run_module(spec, module, tensors)
    # self time per op: children are not counted twice
    per_op = {e.key: e.self_cpu_time_total / 1e6 / runs for e in prof.key_averages() if e.self_cpu_time_total > 0}
    return {"wall_per_call_s": wall, "first_call_s": first,
            "per_op_s": dict(sorted(per_op.items(), key=lambda kv: -kv[1]))}


def by_category(per_op: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for name, seconds in per_op.items():
        out[category(name)] += seconds
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/profile_graphs.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", required=True, type=Path, help="an ONNX Runtime engine folder (manifest.json)")
    p.add_argument("--graphs", default="spatial,denoise")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compile", action="store_true",
                   help="also profile the module through torch.compile, as the torch backend's compile=True runs it")
    p.add_argument("--out", metavar="DIR")
    p.add_argument("--name")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from runtime.backends.torch_backend import Compiled
    from runtime.configs import CheckpointConfigs
    from runtime.engine_folder import EngineFolder
    from runtime.graphs.profile import BuildProfile
    from runtime.graphs.specs import build_specs

    env = common.environment("cpu")
    engines = EngineFolder.open(args.engines)
    manifest = engines.manifest
    checkpoint = CheckpointConfigs.read(manifest["checkpoint"]["path"])
    specs = build_specs(checkpoint, BuildProfile(**manifest["profile"]), manifest["precision"],
                        manifest.get("overrides") or None, manifest["backend"])
    results = {}
    for graph in args.graphs.split(","):
        spec = specs[graph]
        inputs = {k: v.numpy() for k, v in spec.sample(spec.dims_at("opt"), torch.Generator().manual_seed(0)).items()}
        print(f"profiling {graph}", file=sys.stderr)
        module = spec.build()
        runs = {"onnxruntime": profile_ort(engines.onnx_path(graph), inputs, args.runs, args.threads),
                "torch": profile_torch(module, spec, inputs, args.runs)}
        if args.compile:
            with torch.no_grad():
                runs["inductor"] = profile_torch(Compiled(module, spec), spec, inputs, args.runs)
        results[graph] = {name: {**r, "by_category_s": by_category(r["per_op_s"])} for name, r in runs.items()}
    report = {"benchmark": "graph profile", "environment": env, "engines": str(args.engines),
              "checkpoint": manifest["checkpoint"], "precision": manifest["precision"], "runs": args.runs,
              "threads": args.threads, "graphs": results}
    folder = common.results_folder("cpu", args.out)
    name = args.name or f"profile-{manifest['checkpoint']['name']}"
    common.write_json(folder / f"{name}.json", report)
    (folder / f"{name}.md").write_text(markdown(report))
    print((folder / f"{name}.md").read_text())
    return 0


LABELS = {"onnxruntime": "ONNX Runtime", "torch": "torch eager", "inductor": "torch.compile (inductor)"}


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [f"# Graph profile: {report['checkpoint']['name']} ({report['precision']}) on {env['device_name']}", "",
             f"- date: {env['date']}; git commit `{env['git_commit']}`; command: `{env['command']}`",
             f"- {report['runs']} profiled calls per graph after a warm-up, {report['threads']} thread(s); inputs: "
             f"the graph declaration's sample at its opt shape; times per call", "",
             "Operator self-times are summed per category (ONNX Runtime: node kernel times; torch: profiler self "
             "CPU time, which includes the profiler's own per-op cost; inductor's generated kernels count in its "
             "graph call's self time).", ""]
    for graph, runs in report["graphs"].items():
        names = list(runs)
        walls = ", ".join(f"{LABELS[n]} {runs[n]['wall_per_call_s'] * 1e3:.2f} ms" for n in names)
        lines += [f"## {graph}", "", f"Wall time per call (without profiler): {walls}.", ""]
        if "inductor" in runs:
            lines += [f"First call of the compiled module (compilation): {runs['inductor']['first_call_s']:.1f} s.", ""]
        lines += ["| category | " + " | ".join(f"{LABELS[n]} ms | share" for n in names) + " |",
                  "|---|" + "---:|---:|" * len(names)]
        totals = {n: sum(runs[n]["by_category_s"].values()) or 1 for n in names}
        for cat in dict.fromkeys(c for n in names for c in runs[n]["by_category_s"]):
            cells = [(runs[n]["by_category_s"].get(cat, 0.0), totals[n]) for n in names]
            lines.append(f"| {cat} | " + " | ".join(f"{v * 1e3:.2f} | {100 * v / t:.0f}%" for v, t in cells) + " |")
        lines += ["", "Top operators:", "", "| " + " | ".join(f"{LABELS[n]} op | ms" for n in names) + " |",
                  "|" + "---|---:|" * len(names)]
        tops = [list(runs[n]["per_op_s"].items())[:8] for n in names]
        for i in range(max(map(len, tops))):
            cells = [top[i] if i < len(top) else ("", None) for top in tops]
            lines.append("| " + " | ".join(f"{op} | {'' if ms is None else f'{ms * 1e3:.2f}'}" for op, ms in cells)
                         + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
