"""Parity benchmark: how far each backend and precision lands from the fp32 reference pipeline.

    python benchmarks/parity.py --variant tiny-t2i --targets torch:fp32,onnxruntime:fp32,onnxruntime:fp16
    python benchmarks/parity.py --variant tiny-t2v --frames 5 --steps 16 --diffusion-steps 10
    python benchmarks/parity.py --checkpoint /models/nova-d48w1024-sdxl1024 --device cuda \
        --targets reference:fp16,torch:fp16,torch:bf16

Two measurements per target:

1. end to end, against ReferencePipeline in fp32 on the same device with the same random draws:
   latent max / mean abs error and cosine (per latent frame for videos) and pixel PSNR. The draws are
   the target's own (a seeded CPU torch.Generator, the official order), replayed into the fp32
   reference: a 16-bit target draws its noise in 16 bits, so "the same seed" alone would compare two
   different samples;
2. per graph (runner targets): the inputs and outputs of sampled graph calls are recorded during a
   torch fp32 run of the same request (the graphs' modules, which the runner tests hold to the
   reference), then every target's backend runs the same inputs (cast to its input dtypes) and its
   outputs are compared with the recorded ones: max abs, mean abs, cosine. Errors do not accumulate
   here: each call starts from the fp32 trajectory.

Baseline for reading video numbers: with random weights, a DDPM video model under CFG amplifies fp32
rounding about tenfold per latent frame. The report therefore also runs the fp32 reference against
itself with another batch layout (the prompt twice, the draws duplicated: mathematically the same
sample, numerically other kernels) and shows that self-drift per frame beside every target.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from benchmarks.targets import TargetSpec  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = common.comparison_parser(
        "parity", __doc__, "comma list of KIND:PRECISION (reference, torch, inductor, onnxruntime, tensorrt); "
        "default: torch:fp32,onnxruntime:fp32,onnxruntime:fp16 on cpu, reference:fp16,torch:fp16,torch:bf16 on cuda")
    p.add_argument("--graph-samples", type=int, default=3, help="calls compared per graph (evenly spread)")
    p.add_argument("--no-self-drift", action="store_true", help="skip the reference-against-itself baseline")
    p.add_argument("--no-fp64", action="store_true", help="skip the per-graph float64 rounding baseline")
    return p


def default_targets(device: str) -> list[str]:
    if device.startswith("cuda"):
        return ["reference:fp16", "torch:fp16", "torch:bf16"]
    return ["torch:fp32", "onnxruntime:fp32", "onnxruntime:fp16"]


# ---------------------------------------------------------------------------------------------------
# Error measures
# ---------------------------------------------------------------------------------------------------
def compare(actual, expected) -> dict[str, Any]:
    a = np.asarray(actual, dtype=np.float64).ravel()
    e = np.asarray(expected, dtype=np.float64).ravel()
    if a.shape != e.shape:
        raise ValueError(f"shape mismatch: {np.shape(actual)} vs {np.shape(expected)}")
    diff = np.abs(a - e)
    denom = float(np.linalg.norm(a) * np.linalg.norm(e))
    cosine = float(a @ e / denom) if denom > 0 else (1.0 if np.array_equal(a, e) else 0.0)
    finite = bool(np.isfinite(a).all())
    return {"max_abs": float(diff.max(initial=0.0)) if finite else None,
            "mean_abs": float(diff.mean()) if diff.size and finite else None,
            "cosine": cosine if finite else None, "ref_max_abs": float(np.abs(e).max(initial=0.0)),
            "finite": finite}


def psnr(actual: np.ndarray, expected: np.ndarray) -> dict[str, Any]:
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    mse = float(((a - e) ** 2).mean())
    diff = np.abs(a - e)
    return {"psnr_db": "inf" if mse == 0 else 10 * math.log10(255.0 ** 2 / mse), "max_abs": int(diff.max()),
            "differing_share": float((diff > 0).mean())}


def parity_draws(generator):
    """RecordedDraws whose token-order draw is handed out as float32 ranks.

    The token order is the argsort of a uniform draw. 16-bit draws have many ties (a bf16 draw of 4096
    values has about 700 distinct ones), and the runner sorts on the host while the reference sorts on
    its device: on a GPU the two would break ties differently and generate different images from the
    same numbers. Here the draw is taken from the generator as usual (same dtype, same stream), sorted
    on the CPU exactly as the runner sorts it, and handed out as the ranks 0..N-1 (distinct, exact in
    fp32), whose argsort is that order on any device. Both pipelines use the draw only through argsort.
    """
    import torch

    from runtime.draws import RecordedDraws, torch_dtype

    class ParityDraws(RecordedDraws):
        def uniform(self, shape, dtype):
            values = torch.rand(shape, generator=self.generator, device=self._device(), dtype=torch_dtype(dtype))
            order = values.argsort(dim=1)
            positions = torch.arange(shape[1], dtype=torch.float32).view(1, -1, *([1] * (len(shape) - 2)))
            ranks = torch.empty(shape, dtype=torch.float32).scatter_(1, order.cpu(), positions.expand(shape).clone())
            self.tensors.append(ranks)
            return ranks

    return ParityDraws(generator)


def _np(value) -> np.ndarray:
    if hasattr(value, "detach"):
        import torch

        value = value.detach()
        return (value.float() if value.dtype == torch.bfloat16 else value).cpu().numpy()
    return np.asarray(value)


def _pixels(output) -> np.ndarray:
    return output.images if output.images is not None else output.frames


# ---------------------------------------------------------------------------------------------------
# Recording graph calls
# ---------------------------------------------------------------------------------------------------
def expected_calls(runner, options: dict[str, Any]) -> dict[str, int]:
    from runtime.decoder import video_windows
    from runtime.schedules import mask_schedule

    g = runner.geometry
    frames, steps = options["max_latent_length"], len(mask_schedule(g.num_tokens, options["num_inference_steps"]))
    vae = len(video_windows(frames)) if runner.configs.video_vae else frames
    diffusion_steps = options["num_diffusion_steps"]
    if runner.build.unrolls(diffusion_steps):
        diffusion = {"denoise_loop": frames * steps}
    else:
        diffusion = {"denoise": frames * steps * diffusion_steps, "place": frames * steps}
    return {"text_encoder": 1, "temporal_prefill": 1, "temporal_step": frames - 1, "spatial": frames * steps,
            **diffusion, "vae_decoder": vae}


def sample_indices(count: int, samples: int) -> set[int]:
    if count <= 0:
        return set()
    if samples <= 1 or count == 1:
        return {0}
    return {round(i * (count - 1) / (samples - 1)) for i in range(min(samples, count))}


class CallRecorder:
    """Wraps a backend's run(): keeps inputs and outputs (host copies) of the selected calls."""

    def __init__(self, backend, selection: dict[str, set[int]]):
        self.backend, self.selection = backend, selection
        self.counts: dict[str, int] = {}
        self.records: list[dict[str, Any]] = []
        self.original = backend.run
        backend.run = self.run

    def run(self, graph, inputs):
        index = self.counts.get(graph, 0)
        self.counts[graph] = index + 1
        outputs = self.original(graph, inputs)
        if index in self.selection.get(graph, ()):
            # Copies: a CPU tensor can share memory with a host array the runner later updates in place.
            copy = lambda v: np.array(_np(v if isinstance(v, np.ndarray) else self.backend.download(v)), copy=True)  # noqa: E731
            self.records.append({"graph": graph, "call": index, "inputs": {k: copy(v) for k, v in inputs.items()},
                                 "outputs": {k: copy(v) for k, v in outputs.items()}})
        return outputs

    def restore(self) -> None:
        self.backend.run = self.original


def replay_graph_calls(runner, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run the recorded inputs through `runner`'s backend (cast to its input dtypes) -> errors per output."""
    import torch

    backend, out = runner.backend, []
    for record in records:
        declaration = runner.graphs[record["graph"]]
        feeds = {}
        for tensor in declaration["inputs"]:
            name, dtype = tensor["name"], tensor["dtype"]
            if name not in record["inputs"]:
                continue
            value = record["inputs"][name]
            if backend.name == "torch":
                feeds[name] = backend.upload(np.ascontiguousarray(value)).to(getattr(torch, dtype))
            else:
                feeds[name] = backend.upload(np.ascontiguousarray(value.astype(_numpy_dtype(dtype))))
        with torch.no_grad():
            result = backend.run(record["graph"], feeds)
        for tensor in declaration["outputs"]:
            name, dtype = tensor["name"], tensor["dtype"]
            actual = _np(backend.download(result[name]))
            expected = record["outputs"][name]
            error = compare(actual, expected)
            if dtype == "uint8":
                error.update(psnr(actual, expected))
            out.append({"graph": record["graph"], "call": record["call"], "output": name, "dtype": dtype, **error})
    return out


def fp64_graph_errors(runner, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rounding scale of each graph: the recorded fp32 outputs against the same torch module run in
    float64 (weights and compute; the few explicit fp32 casts inside the graphs stay) on the recorded
    inputs. A backend's fp32 error of the same size as this is rounding, not a defect."""
    import copy

    import torch

    from runtime.graphs.common import GraphModule
    from runtime.graphs.contract import run_module

    backend, out = runner.backend, []
    for graph in dict.fromkeys(r["graph"] for r in records):
        module = copy.deepcopy(backend.modules[graph]).double()
        for sub in module.modules():
            if isinstance(sub, GraphModule):
                sub.compute_dtype = torch.float64
        spec = backend.specs[graph]
        for record in (r for r in records if r["graph"] == graph):
            inputs = {}
            for name, value in record["inputs"].items():
                tensor = torch.from_numpy(np.ascontiguousarray(value)).to(backend.device)
                inputs[name] = tensor.double() if tensor.is_floating_point() else tensor
            result = run_module(spec, module, inputs)
            for tensor in spec.outputs:
                exact = _np(result[tensor.name])
                error = compare(record["outputs"][tensor.name], exact)
                if tensor.dtype == "uint8":
                    error.update(psnr(record["outputs"][tensor.name], exact))
                out.append({"graph": graph, "call": record["call"], "output": tensor.name, "dtype": tensor.dtype,
                            **error})
        del module
    return out


def _numpy_dtype(name: str):
    if name == "bfloat16":
        raise ValueError("numpy (and ONNX Runtime's CPU provider) has no bfloat16 inputs")
    return {"float32": np.float32, "float16": np.float16, "int64": np.int64, "uint8": np.uint8,
            "bool": np.bool_}[name]


def summarize_graph_errors(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Worst over the sampled calls, per (graph, output)."""
    worst: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        key = (row["graph"], row["output"])
        w = worst.setdefault(key, {"graph": row["graph"], "output": row["output"], "dtype": row["dtype"], "calls": [],
                                   "max_abs": 0.0, "mean_abs": 0.0, "cosine": 1.0, "ref_max_abs": 0.0,
                                   "finite": True})
        w["calls"].append(row["call"])
        w["finite"] = w["finite"] and row["finite"]
        if not row["finite"]:
            continue
        w["max_abs"] = max(w["max_abs"], row["max_abs"])
        w["mean_abs"] = max(w["mean_abs"], row["mean_abs"])
        w["cosine"] = min(w["cosine"], row["cosine"])
        w["ref_max_abs"] = max(w["ref_max_abs"], row["ref_max_abs"])
        if "psnr_db" in row:
            previous = w.get("psnr_db", "inf")
            values = [v for v in (previous, row["psnr_db"]) if v != "inf"]
            w["psnr_db"] = min(values) if values else "inf"
    return list(worst.values())


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------
def end_to_end(output_latents, output_pixels, baseline) -> dict[str, Any]:
    ref_latents = _np(baseline.latents)
    ours = _np(output_latents)
    frames = ours.shape[2]
    return {"latents": compare(ours, ref_latents),
            "per_frame_max_abs": [float(np.abs(ours[:, :, t].astype(np.float64) - ref_latents[:, :, t]).max())
                                  for t in range(frames)],
            "per_frame_cosine": [compare(ours[:, :, t], ref_latents[:, :, t])["cosine"] for t in range(frames)],
            "pixels": psnr(output_pixels, _pixels(baseline))}


def run_parity(args) -> dict[str, Any]:
    import torch

    from benchmarks.latency import engine_folders, parse_engines
    from benchmarks.targets import Target, build_profile
    from runtime.checkpoint import resolve_checkpoint
    from runtime.draws import ReplayDraws
    from runtime.runner import NOVARunner

    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    torch.set_num_threads(args.threads)
    import os

    os.environ.setdefault("NOVA_ORT_THREADS", str(args.threads))
    if args.device.startswith("cuda"):  # an fp32 baseline, not TF32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    started = time.perf_counter()
    env = common.environment(args.device)
    checkpoint = resolve_checkpoint(args.checkpoint, args.variant, specs=common.bench_variants(),
                                    root=common.CHECKPOINT_ROOT)
    specs = [TargetSpec.parse(t) for t in (args.targets.split(",") if args.targets else default_targets(args.device))]
    options = {"num_inference_steps": args.steps, "num_diffusion_steps": args.diffusion_steps,
               "guidance_scale": args.guidance_scale, "max_latent_length": args.frames}
    profile = build_profile(checkpoint, args.steps, args.diffusion_steps, args.frames, args.guidance_scale)
    folders, builds = engine_folders(specs, parse_engines(args.engines), checkpoint, args, profile, log)
    generator = lambda: torch.Generator().manual_seed(args.seed)  # noqa: E731  (CPU: the runner's own choice)

    log("reference fp32 (baseline)")
    reference = Target(TargetSpec("reference", "fp32"), checkpoint, args.device)
    baselines: dict[str, Any] = {}  # draw dtype -> (draw tensors, reference output)

    def baseline_for(draw_dtype: str, tensors: list) -> Any:
        if draw_dtype not in baselines:
            log(f"reference fp32 replaying {draw_dtype} draws")
            baselines[draw_dtype] = reference.run(args.prompt, args.seed, options, instrument=False,
                                                  draws=ReplayDraws(tensors)).output
        return baselines[draw_dtype]

    # 1. the fp32 trajectory: the torch backend at fp32, recording sampled graph calls
    log("runner torch fp32 (recording graph calls)")
    recorder_runner = NOVARunner.from_checkpoint(checkpoint, profile, precision="fp32", device=args.device)
    selection = {g: sample_indices(n, args.graph_samples) for g, n in expected_calls(recorder_runner, options).items()}
    recorder = CallRecorder(recorder_runner.backend, selection)
    fp32_draws = parity_draws(generator())
    fp32_output = recorder_runner(args.prompt, draws=fp32_draws, **options)
    recorder.restore()
    records = recorder.records
    baseline_for("fp32", fp32_draws.tensors)
    rounding = None
    if not args.no_fp64:
        log("graph modules in float64 on the recorded inputs (rounding scale)")
        rounding = summarize_graph_errors(fp64_graph_errors(recorder_runner, records))

    # 2. the reference against itself, another batch layout (same draws, duplicated)
    self_drift = None
    if not args.no_self_drift:
        log("reference fp32 against itself (prompt twice, draws duplicated)")
        doubled = reference.pipe([args.prompt] * 2, draws=ReplayDraws([torch.cat([t, t]) for t in fp32_draws.tensors]),
                                 disable_progress_bar=True, output_type="np", **options)
        second_latents = doubled.latents[1:]
        self_drift = end_to_end(second_latents, _pixels(doubled)[1:], baselines["fp32"])

    # 3. targets
    results = []
    for spec in specs:
        log(f"target {spec.label}")
        entry: dict[str, Any] = {"target": spec.label, "kind": spec.kind, "precision": spec.precision}
        start = time.perf_counter()
        try:
            if spec.label == "torch:fp32" and args.device == recorder_runner.backend.device.type:
                target_runner, output, draws = recorder_runner, fp32_output, fp32_draws
            elif spec.is_reference:
                target = Target(spec, checkpoint, args.device)
                draws = parity_draws(generator())
                output = target.run(args.prompt, args.seed, options, instrument=False, draws=draws).output
                target_runner = None
            else:
                target = Target(spec, checkpoint, args.device, engines=folders.get(spec.label), profile=profile)
                target_runner = target.runner
                draws = parity_draws(generator())
                output = target_runner(args.prompt, draws=draws, **options)
        except Exception as error:  # a backend that cannot run here is reported, not fatal
            entry["error"] = f"{type(error).__name__}: {error}"
            log(f"  {spec.label}: {entry['error']}")
            results.append(entry)
            continue
        draw_dtype = str(draws.tensors[-1].dtype).replace("torch.", "")  # the last draw is noise (normal)
        entry["draws"] = draw_dtype
        entry["end_to_end"] = end_to_end(output.latents, _pixels(output), baseline_for(draw_dtype, draws.tensors))
        if target_runner is not None:
            try:
                entry["graphs"] = summarize_graph_errors(replay_graph_calls(target_runner, records))
            except Exception as error:
                entry["graphs_error"] = f"{type(error).__name__}: {error}"
        entry["seconds"] = time.perf_counter() - start
        results.append(entry)
    from benchmarks.common import describe_variant

    env["load_average_at_end"] = common.load_average()
    return {"benchmark": "parity", "environment": env,
            "checkpoint": {"path": str(checkpoint), "name": checkpoint.resolve().name,
                           "variant": None if args.checkpoint else args.variant,
                           "variant_configs": describe_variant(args.variant) if not args.checkpoint else None},
            "settings": {"prompt": args.prompt, "seed": args.seed, **options, "graph_samples": args.graph_samples,
                         "sampled_calls": {g: sorted(s) for g, s in selection.items() if s},
                         "baseline": f"reference:fp32 on {args.device} (TF32 off)", "exporter": args.exporter},
            "engine_builds": builds, "self_drift": self_drift, "graph_rounding_fp32_vs_fp64": rounding,
            "targets": results,
            "wall_seconds": time.perf_counter() - started}


# ---------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------
def _e(value) -> str:
    if value is None:
        return "–"
    if value == 0:
        return "0"
    return f"{value:.2e}"


def _cos(value) -> str:
    return "–" if value is None else f"{value:.6f}" if value > 0.999 else f"{value:.4f}"


def _db(value) -> str:
    return "–" if value is None else "identical" if value == "inf" else f"{value:.1f} dB"


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [*common.markdown_header("Parity", report),
             f"- request: 1 prompt, {s['num_inference_steps']} mask steps x {s['num_diffusion_steps']} diffusion steps, "
             f"{s['max_latent_length']} latent frame(s), guidance {s['guidance_scale']:g}, seed {s['seed']}",
             f"- baseline: {s['baseline']}, replaying each target's own random draws (16-bit targets draw 16-bit "
             f"noise)", "",
             "## End to end (against the fp32 reference)", "",
             "| target | draws | latent max abs | latent mean abs | latent cosine | pixel PSNR | pixel max diff | "
             "pixels differing |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    rows = []
    if report["self_drift"]:
        rows.append(("reference:fp32, other batch layout (self-drift)", "fp32", report["self_drift"]))
    rows += [(t["target"], t.get("draws", "–"), t.get("end_to_end")) for t in report["targets"]]
    for label, draws, e in rows:
        if e is None:
            continue
        lines.append(f"| {label} | {draws} | {_e(e['latents']['max_abs'])} | {_e(e['latents']['mean_abs'])} | "
                     f"{_cos(e['latents']['cosine'])} | {_db(e['pixels']['psnr_db'])} | {e['pixels']['max_abs']} | "
                     f"{100 * e['pixels']['differing_share']:.2f}% |")
    for t in report["targets"]:
        if "error" in t:
            lines.append(f"| {t['target']} | – | not run: {t['error'].splitlines()[0][:160]} | | | | | |")
    frames = s["max_latent_length"]
    if frames > 1:
        lines += ["", "## Latent max abs error per latent frame", "",
                  "Random-weight video models amplify rounding about tenfold per frame; compare each row with the "
                  "self-drift row (the fp32 reference against itself).", "",
                  "| target | " + " | ".join(f"frame {t}" for t in range(frames)) + " |",
                  "|---|" + "---:|" * frames]
        for label, _, e in rows:
            if e is not None:
                lines.append(f"| {label} | " + " | ".join(_e(v) for v in e["per_frame_max_abs"]) + " |")
    lines += ["", "## Per graph (sampled calls of the fp32 trajectory; worst over the samples)", "",
              "Each target's graph outputs against the recorded torch fp32 outputs on the same inputs. The first "
              "rows give the rounding scale: the recorded fp32 outputs against the same modules run in float64.", "",
              "Calls sampled per graph: " + ", ".join(f"{g} {c}" for g, c in s["sampled_calls"].items()), "",
              "| target | graph | output | max abs | mean abs | cosine | reference max abs | note |",
              "|---|---|---|---:|---:|---:|---:|---|"]
    graph_rows = []
    if report.get("graph_rounding_fp32_vs_fp64"):
        graph_rows.append({"target": "torch:fp32 vs float64 (rounding scale)", "kind": "baseline",
                           "graphs": report["graph_rounding_fp32_vs_fp64"]})
    for t in graph_rows + report["targets"]:
        if "graphs_error" in t:
            lines.append(f"| {t['target']} | – | – | | | | | not run: {t['graphs_error'][:160]} |")
        for g in t.get("graphs", []):
            note = "" if g["finite"] else "NON-FINITE"
            if "psnr_db" in g:
                note = f"PSNR {_db(g['psnr_db'])}"
            lines.append(f"| {t['target']} | {g['graph']} | {g['output']} | {_e(g['max_abs'])} | {_e(g['mean_abs'])} | "
                         f"{_cos(g['cosine'])} | {_e(g['ref_max_abs'])} | {note} |")
        if t["kind"] == "reference" and "error" not in t:
            lines.append(f"| {t['target']} | (eager pipeline: no graphs) | | | | | | |")
    return "\n".join(lines + common.markdown_footer(report))


def chart(report: dict[str, Any], path: Path) -> Path:
    from benchmarks.charts import log_lines

    series = []
    if report["self_drift"]:
        series.append(("reference self-drift", report["self_drift"]["per_frame_max_abs"]))
    for t in report["targets"]:
        if t.get("end_to_end"):
            series.append((t["target"], t["end_to_end"]["per_frame_max_abs"]))
    env, s = report["environment"], report["settings"]
    subtitle = (f"{env['device_name']}; {s['num_inference_steps']}x{s['num_diffusion_steps']} steps, seed {s['seed']}; "
                f"against reference:fp32 with the same draws; {env['date'][:10]}, {env['git_commit'][:12]}")
    return log_lines(path, f"NOVA parity: latent max abs error per frame, {report['checkpoint']['name']}", subtitle,
                     series, "latent frame", "max |latent - reference|")


def main(argv: list[str] | None = None) -> int:
    return common.report_main(parser().parse_args(argv), run_parity, markdown, chart, "parity", "## Per graph")


if __name__ == "__main__":
    sys.exit(main())
