"""Latency benchmark: the reference pipeline and the runner's backends, side by side, one checkpoint.

    python benchmarks/latency.py --variant mid-t2i                       # CPU: reference, torch, onnxruntime (fp32)
    python benchmarks/latency.py --variant tiny-t2i --repetitions 9
    python benchmarks/latency.py --checkpoint /models/nova-d48w1024-sdxl1024 --device cuda \
        --targets reference:fp16,torch:fp16
    python benchmarks/latency.py --variant mid-t2i --official ../NOVA   # + the official pipeline (a checkout)

Method (the numbers are only as good as this):
- every target runs in its own fresh process (peak memory per target is that process's high-water
  mark: RSS on a CPU, torch.cuda.max_memory_allocated during generation on a GPU), all loaded side
  by side, and the parent interleaves their repetitions (round robin, the starting target rotating
  every round), so load that comes and goes on a shared machine spreads over every target alike;
- warm-up runs first (not counted); then median and p90 over the repetitions; speed-ups are ratios of
  medians against the first reference target and, with --official, against the official pipeline, whose
  pixels every target's are compared with (same seed: the runtime draws in the official order);
- the same prompt, seed, steps and build profile for every target; ONNX Runtime engines are built in
  the same run (reused when unchanged) or given with --engines;
- per-stage seconds and per-graph call counts come from instrumented runs; on a GPU each timed region
  synchronizes, so there the end-to-end figure comes from separate plain runs;
- achieved FLOP/s per stage use the analytic counts of NOVA_SPEC §6 (benchmarks/flops.py) and are set
  against a matrix-multiply rate measured in the same run, on the same threads.

Reports: <out>/<name>.json (everything, with device, versions, command, date, git commit),
<name>.md (tables) and <name>.png (chart) under benchmarks/results/<date>-<device>/ by default.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from benchmarks.targets import STAGES, TargetSpec  # noqa: E402

PROTOCOL = "@@bench "
GRAPH_STAGE = {"text_encoder": "text", "temporal_prefill": "temporal", "temporal_step": "temporal",
               "spatial": "spatial", "denoise": "denoise", "place": "denoise", "denoise_loop": "denoise",
               "vae_decoder": "vae",
               "vae_encoder": "vae"}


def parser() -> argparse.ArgumentParser:
    p = common.comparison_parser(
        "latency", __doc__, "comma list of KIND:PRECISION (official, reference, torch, inductor: torch with "
        "torch.compile, onnxruntime, tensorrt); default: reference:fp32,torch:fp32,onnxruntime:fp32 on cpu, "
        "reference:fp16,torch:fp16 on cuda")
    p.add_argument("--official", metavar="PATH", type=Path,
                   help="a checkout of the official code (baaivision/NOVA): adds the official target "
                        "(official:fp32 on cpu, official:fp16 on cuda) unless --targets names it")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per target before the repetitions")
    p.add_argument("--repetitions", type=int, default=5, help="timed runs per target")
    p.add_argument("--stage-runs", choices=("auto", "same", "separate"), default="auto",
                   help="per-stage timings from the timed runs themselves (same) or from extra instrumented "
                        "runs (separate; auto = separate on cuda, where timing regions synchronize)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p


# ---------------------------------------------------------------------------------------------------
# Worker: one target in its own process, driven over stdin/stdout
# ---------------------------------------------------------------------------------------------------
def worker(config: dict[str, Any]) -> int:
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything libraries print goes to stderr, not into the protocol

    def send(message: dict[str, Any]) -> None:
        protocol.write(PROTOCOL + json.dumps(message) + "\n")
        protocol.flush()

    import torch

    torch.set_num_threads(config["threads"])
    from benchmarks.targets import Target, build_profile

    spec = TargetSpec.parse(config["target"])
    profile = build_profile(Path(config["checkpoint"]), config["options"]["num_inference_steps"],
                            config["options"]["num_diffusion_steps"], config["options"].get("max_latent_length", 1),
                            config["options"]["guidance_scale"])
    try:
        target = Target(spec, Path(config["checkpoint"]), config["device"],
                        engines=Path(config["engines"]) if config.get("engines") else None, profile=profile,
                        official=config.get("official"))
    except Exception as error:  # reported to the parent, which names the target
        send({"error": f"{type(error).__name__}: {error}"})
        return 1
    memory = target.memory()
    if config["device"].startswith("cuda"):
        torch.cuda.synchronize(config["device"])
        torch.cuda.reset_peak_memory_stats(config["device"])
    send({"ready": True, "load_seconds": target.load_seconds, "memory_after_load": memory,
          "placement": getattr(getattr(getattr(target, "runner", None), "backend", None), "placement", None),
          "backend": getattr(getattr(target, "runner", None), "backend", None).__class__.__name__
          if not spec.is_pipeline else type(target.pipe).__name__})
    for line in sys.stdin:
        command = json.loads(line)
        if command["cmd"] == "quit":
            send({"memory": target.memory()})
            return 0
        try:
            result = target.run(config["prompt"], config["seed"], config["options"], instrument=command["instrument"])
        except Exception as error:
            send({"error": f"{type(error).__name__}: {error}"})
            return 1
        output = result.output
        images = getattr(output, "images", None)  # the official video output has frames only
        pixels = images if images is not None else output.frames
        np.save(config["pixels"], pixels)  # the last run's, for the comparison with the official pixels
        latents = getattr(output, "latents", None)  # the official output has none
        latents = latents.float().cpu().numpy() if hasattr(latents, "cpu") else latents
        send({"seconds": result.seconds, "stages": result.stages, "calls": result.calls,
              "pixels_shape": list(pixels.shape),
              "latent_mean_abs": None if latents is None else float(abs(latents).mean())})
    return 0


class WorkerProcess:
    def __init__(self, config: dict[str, Any], log: Path):
        self.label = config["target"]
        self.log = log
        env = {**os.environ, "NOVA_ORT_THREADS": str(config["threads"]), "OMP_NUM_THREADS": str(config["threads"]),
               "PYTHONPATH": str(common.ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(config)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log, "w"),
                                        text=True, cwd=common.ROOT, env=env)

    def receive(self) -> dict[str, Any]:
        for line in self.process.stdout:
            if line.startswith(PROTOCOL):
                message = json.loads(line[len(PROTOCOL):])
                if "error" in message:
                    raise RuntimeError(f"{self.label}: {message['error']}")
                return message
        tail = self.log.read_text()[-3000:] if self.log.exists() else ""
        raise RuntimeError(f"{self.label}: the worker exited (code {self.process.wait()}); its log ends with:\n{tail}")

    def command(self, **message) -> dict[str, Any]:
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()
        return self.receive()

    def close(self) -> dict[str, Any]:
        try:
            return self.command(cmd="quit")
        finally:
            self.process.stdin.close()
            self.process.wait(timeout=120)


# ---------------------------------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------------------------------
def default_targets(device: str) -> list[str]:
    if device.startswith("cuda"):
        return ["reference:fp16", "torch:fp16"]
    return ["reference:fp32", "torch:fp32", "onnxruntime:fp32"]


def target_specs(targets: str | None, device: str, official: Path | None) -> list[TargetSpec]:
    """The run's targets: --targets or the device's defaults, the official one first when --official is given
    and --targets does not name it. Checked before any work: one sentence for a bad combination."""
    specs = [TargetSpec.parse(t) for t in (targets.split(",") if targets else default_targets(device))]
    if len({s.label for s in specs}) != len(specs):
        raise ValueError("each target may appear once")
    named = [s for s in specs if s.kind == "official"]
    if named and official is None:
        raise ValueError("the official target needs --official PATH (a checkout of baaivision/NOVA)")
    if official is not None:
        from benchmarks.official import check_checkout

        check_checkout(official)
        if not named:
            specs.insert(0, TargetSpec("official", "fp16" if device.startswith("cuda") else "fp32"))
    return specs


def parse_engines(values: list[str]) -> dict[str, Path]:
    out = {}
    for value in values:
        precision, sep, folder = value.partition("=")
        if not sep:
            folder, precision = value, "*"
        out[precision] = Path(folder)
    return out


def engine_folders(specs: list[TargetSpec], given: dict[str, Path], checkpoint: Path, args, profile,
                   log) -> tuple[dict[str, Path], list[dict[str, Any]]]:
    """One engine folder per (engine kind, precision): given, or built now (reused when unchanged)."""
    from benchmarks.targets import build_engines

    folders, builds = {}, []
    for spec in specs:
        if not spec.needs_engines or spec.label in folders:
            continue
        folder = given.get(spec.precision) or given.get("*")
        if folder is None:
            backend = "tensorrt" if spec.kind == "tensorrt" else "onnxruntime"
            folder = args.engines_root / f"bench-{checkpoint.resolve().name}-{spec.precision}"
            if backend == "tensorrt":
                folder = folder.with_name(folder.name + "-trt")
            log(f"building {backend} engines ({spec.precision}, {args.exporter}) -> {folder}")
            start = time.perf_counter()
            build_engines(checkpoint, spec.precision, folder, profile, backend=backend, exporter=args.exporter,
                          threads=args.threads)
            builds.append({"target": spec.label, "folder": str(folder), "seconds": time.perf_counter() - start,
                           "exporter": args.exporter})
        folders[spec.label] = folder
    return folders, builds


def run_benchmark(args) -> dict[str, Any]:
    import torch

    from benchmarks import flops as flop_counts
    from benchmarks.targets import build_profile
    from runtime.checkpoint import resolve_checkpoint
    from runtime.graphs.profile import Geometry
    from runtime.configs import CheckpointConfigs

    started = time.perf_counter()
    # seconds since the start on every line: a log cut off by a time limit still says where the time went
    log = lambda message: print(f"[{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)  # noqa: E731
    torch.set_num_threads(args.threads)
    env = common.environment(args.device)
    checkpoint = resolve_checkpoint(args.checkpoint, args.variant, specs=common.bench_variants(),
                                    root=common.CHECKPOINT_ROOT)
    specs = target_specs(args.targets, args.device, args.official)
    options = {"num_inference_steps": args.steps, "num_diffusion_steps": args.diffusion_steps,
               "guidance_scale": args.guidance_scale, "max_latent_length": args.frames}
    profile = build_profile(checkpoint, args.steps, args.diffusion_steps, args.frames, args.guidance_scale)
    geometry = Geometry.from_config(CheckpointConfigs.read(checkpoint).transformer, profile)
    counts = flop_counts.for_checkpoint(checkpoint, steps=args.steps, diffusion_steps=args.diffusion_steps,
                                        frames=args.frames, cfg=args.guidance_scale > 1,
                                        max_tokens_per_step=geometry.max_tokens_per_step)
    folders, builds = engine_folders(specs, parse_engines(args.engines), checkpoint, args, profile, log)
    stage_runs = args.stage_runs if args.stage_runs != "auto" else ("separate" if args.device.startswith("cuda")
                                                                     else "same")
    rate_dtypes = ["fp16", "bf16", "tf32", "fp32"] if args.device.startswith("cuda") else ["fp32"]
    log("measuring the matrix-multiply rate")
    rates_before = {d: common.matmul_rate(args.device, d) for d in rate_dtypes}
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()

    logs = Path(tempfile.mkdtemp(prefix="nova-bench-"))
    workers: list[WorkerProcess] = []
    results: dict[str, dict[str, Any]] = {}
    try:
        for spec in specs:  # loaded one after another; each waits idle while the others run
            config = {"target": spec.label, "checkpoint": str(checkpoint), "device": args.device,
                      "engines": str(folders[spec.label]) if spec.label in folders else None, "threads": args.threads,
                      "prompt": args.prompt, "seed": args.seed, "options": options,
                      "official": str(args.official.resolve()) if args.official else None,
                      "pixels": str(logs / f"{spec.label.replace(':', '-')}-pixels.npy")}
            log(f"loading {spec.label}")
            w = WorkerProcess(config, logs / f"{spec.label.replace(':', '-')}.log")
            workers.append(w)
            ready = w.receive()
            results[spec.label] = {"target": spec.label, "kind": spec.kind, "precision": spec.precision,
                                   "backend": ready["backend"], "engines": config["engines"],
                                   "load_seconds": ready["load_seconds"], "memory_after_load": ready["memory_after_load"],
                                   "pixels_file": config["pixels"],
                                   "placement": ready.get("placement"),
                                   "warmup_seconds": [], "e2e": [], "stage_runs": [], "calls": [], "checks": []}
        for round_ in range(args.warmup):
            for w in workers:
                log(f"warm-up {round_ + 1}/{args.warmup}: {w.label}")
                results[w.label]["warmup_seconds"].append(w.command(cmd="run", instrument=True)["seconds"])
        for rep in range(args.repetitions):
            order = workers[rep % len(workers):] + workers[: rep % len(workers)]
            for w in order:
                r = results[w.label]
                if stage_runs == "separate":
                    plain = w.command(cmd="run", instrument=False)
                    r["e2e"].append(plain["seconds"])
                    timed = w.command(cmd="run", instrument=True)
                else:
                    timed = w.command(cmd="run", instrument=True)
                    r["e2e"].append(timed["seconds"])
                r["stage_runs"].append(timed["stages"])
                r["calls"].append(timed["calls"])
                r["checks"].append({"pixels_shape": timed["pixels_shape"], "latent_mean_abs": timed["latent_mean_abs"]})
                log(f"rep {rep + 1}/{args.repetitions} {w.label}: {r['e2e'][-1]:.3f} s")
        for w in workers:
            results[w.label]["memory"] = w.close()["memory"]
    finally:
        for w in workers:
            if w.process.poll() is None:
                w.process.kill()
    rates_after = {d: common.matmul_rate(args.device, d) for d in rate_dtypes}
    env["load_average_at_end"] = common.load_average()
    return summarize_run(args, env, checkpoint, counts, geometry, builds, stage_runs, rates_before, rates_after,
                         results, time.perf_counter() - started)


def summarize_run(args, env, checkpoint: Path, counts, geometry, builds, stage_runs, rates_before, rates_after,
                  results, wall) -> dict[str, Any]:
    rates = {d: {"before": rates_before[d], "after": rates_after[d],
                 "flops_per_s": (rates_before[d]["flops_per_s"] + rates_after[d]["flops_per_s"]) / 2}
             for d in rates_before}
    reference = next((r for r in results.values() if r["kind"] == "reference"), None)
    targets = []
    for r in results.values():
        e2e = common.summarize(r["e2e"])
        stages = {s: common.summarize([run.get(s, 0.0) for run in r["stage_runs"]]) for s in (*STAGES, "other")}
        calls = {}
        for name in sorted({k for run in r["calls"] for k in run}):
            per_run = [run.get(name, {"calls": 0, "seconds": 0.0}) for run in r["calls"]]
            seconds = common.percentile([c["seconds"] for c in per_run], 50)
            n = per_run[0]["calls"]
            calls[name] = {"calls": n, "seconds_median": seconds, "per_call_seconds": seconds / n if n else None}
        rate_key = r["precision"] if r["precision"] in rates else "fp32"
        ceiling = rates[rate_key]["flops_per_s"] if rate_key in rates else rates["fp32"]["flops_per_s"]
        throughput = {}
        for s in STAGES:
            t = stages[s]["median"]
            useful = counts["useful"][s] / t if t > 0 else None
            work = counts["useful"][s] if r["kind"] in ("reference", "official") else counts["executed"][s]
            executed = work / t if t > 0 else None
            throughput[s] = {"useful_flops_per_s": useful, "executed_flops_per_s": executed,
                             "executed_fraction_of_matmul": executed / ceiling if executed else None}
        total_useful = sum(counts["useful"].values())
        entry = {**{k: r.get(k) for k in ("target", "kind", "precision", "backend", "engines", "load_seconds",
                                          "warmup_seconds", "memory_after_load", "memory", "placement")},
                 "e2e_seconds": r["e2e"], "e2e": e2e, "stage_seconds_runs": r["stage_runs"], "stages": stages,
                 "graph_calls": calls, "throughput": throughput, "matmul_dtype": rate_key,
                 "useful_flops_per_s_e2e": total_useful / e2e["median"], "checks": r["checks"][0] if r["checks"] else {}}
        if reference is not None:
            ref_e2e = common.percentile(reference["e2e"], 50)
            ref_stages = {s: common.percentile([run.get(s, 0.0) for run in reference["stage_runs"]], 50)
                          for s in (*STAGES, "other")}
            entry["speedup_vs_reference"] = {"reference": reference["target"], "e2e": ref_e2e / e2e["median"],
                                             **{s: (ref_stages[s] / stages[s]["median"]) if stages[s]["median"] > 0
                                                else None for s in (*STAGES, "other")}}
        official = official_baseline(results.values(), r["precision"])
        if official is not None:
            entry["official"] = official["target"]
            entry["speedup_vs_official"] = common.percentile(official["e2e"], 50) / e2e["median"]
            entry["pixels_vs_official"] = pixel_difference(np.load(r["pixels_file"]), np.load(official["pixels_file"]))
        entry["overhead"] = call_overhead(entry, counts, geometry, ceiling) if r["kind"] not in ("reference", "official") \
            else None
        targets.append(entry)
    from benchmarks.common import describe_variant

    return {"benchmark": "latency", "environment": env,
            "checkpoint": {"path": str(checkpoint), "name": checkpoint.resolve().name,
                           "variant": None if args.checkpoint else args.variant,
                           "variant_configs": describe_variant(args.variant) if not args.checkpoint else None},
            "settings": {"prompt": args.prompt, "seed": args.seed, "num_inference_steps": args.steps,
                         "num_diffusion_steps": args.diffusion_steps, "max_latent_length": args.frames,
                         "guidance_scale": args.guidance_scale, "warmup": args.warmup,
                         "repetitions": args.repetitions, "threads": args.threads, "stage_runs": stage_runs,
                         "exporter": args.exporter, "build_profile": geometry.to_dict()},
            "engine_builds": builds, "flops": counts, "matmul_rate": rates, "targets": targets,
            "wall_seconds": wall}


def official_baseline(results, precision: str) -> dict[str, Any] | None:
    """The official target a target is compared with: the one of its precision where one ran, else the first."""
    officials = [r for r in results if r["kind"] == "official"]
    return next((r for r in officials if r["precision"] == precision), officials[0] if officials else None)


def pixel_difference(pixels, official) -> dict[str, Any]:
    """Same-seed difference of a target's uint8 pixels from the official ones, in levels of 255."""
    if pixels.shape != official.shape:
        return {"error": f"shape {list(pixels.shape)} against the official {list(official.shape)}"}
    diff = np.abs(pixels.astype(np.int16) - official.astype(np.int16))
    return {"mean_abs_levels": float(diff.mean()), "max_abs_levels": int(diff.max()),
            "share_above_1_level": float((diff > 1).mean())}


def call_overhead(entry: dict[str, Any], counts, geometry, ceiling: float) -> dict[str, Any]:
    """Per graph: calls, seconds per call, and the compute floor per call (the graph's executed FLOPs
    at the measured matmul rate). What is above the floor is dispatch/launch overhead plus kernels
    running below the matmul rate (attention, norms, elementwise work, small shapes)."""
    per_call_flops = counts["executed_per_graph_call"]
    out = {}
    for name, c in entry["graph_calls"].items():
        flops = per_call_flops.get(name)
        floor = flops / ceiling if flops is not None else None
        per_call = c["per_call_seconds"]
        out[name] = {"calls": c["calls"], "per_call_seconds": per_call, "flops_per_call": flops,
                     "compute_floor_seconds": floor,
                     "above_floor_seconds": per_call - floor if floor is not None and per_call is not None else None,
                     "total_seconds": c["seconds_median"]}
    return out


# ---------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------
def _s(value: float | None) -> str:
    if value is None:
        return "–"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    if value >= 0.01:
        return f"{value:.3f}"
    return f"{value:.2g}"


def _rate(value: float | None) -> str:
    if not value:
        return "–"
    if value >= 1e12:
        return f"{value / 1e12:.1f} T"
    return f"{value / 1e9:.1f} G" if value >= 1e9 else f"{value / 1e6:.0f} M"


def _bytes(value: int | None) -> str:
    return "–" if not value else f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB"


def _flops(value: float) -> str:
    return f"{value / 1e12:.3g} TF" if value >= 1e11 else f"{value / 1e9:.3g} GF" if value >= 1e8 else f"{value / 1e6:.3g} MF"


def markdown(report: dict[str, Any]) -> str:
    env, settings = report["environment"], report["settings"]
    cuda = env["device"].startswith("cuda")
    lines = [*common.markdown_header("Latency", report),
             f"- load average (1/5/15 min) at start {env['load_average_at_start']}, at end "
             f"{env.get('load_average_at_end')}; {env['logical_cpus']} logical CPUs, {settings['threads']} thread(s) "
             f"per target",
             f"- request: 1 prompt, {settings['num_inference_steps']} mask steps x {settings['num_diffusion_steps']} "
             f"diffusion steps, {settings['max_latent_length']} latent frame(s), guidance {settings['guidance_scale']:g}, "
             f"seed {settings['seed']}",
             f"- {settings['warmup']} warm-up + {settings['repetitions']} timed runs per target, interleaved round "
             f"robin, each target in its own process; stage timings from "
             f"{'the timed runs' if settings['stage_runs'] == 'same' else 'separate instrumented runs'}",
             ""]
    rates = report["matmul_rate"]
    lines.append("Measured matrix-multiply rate (torch, same run): " + "; ".join(
        f"{d} {_rate(r['flops_per_s'])}FLOP/s (before {_rate(r['before']['flops_per_s'])}, after "
        f"{_rate(r['after']['flops_per_s'])}, {r['before']['size']}^3)" for d, r in rates.items()))
    official = any(t["kind"] == "official" for t in report["targets"])
    several = sum(t["kind"] == "official" for t in report["targets"]) > 1  # then each ratio names its baseline
    lines += ["", "## End to end", "",
              "| target | median s | p90 s | " + ("speed-up vs official | pixels vs official (mean / max levels, "
                                                    "share > 1 level) | " if official else "")
              + "speed-up vs reference | useful FLOP/s | first run s | load s | "
              + ("GPU memory after load | peak GPU memory allocated |" if cuda else "RSS after load | peak RSS |"),
              "|---|---:|---:|" + ("---:|---:|" if official else "") + "---:|---:|---:|---:|---:|---:|"]
    for t in report["targets"]:
        speed = t.get("speedup_vs_reference", {}).get("e2e")
        baseline = f" (vs {t['official']})" if several and "official" in t else ""
        key, peak_key = ("cuda_allocated_bytes", "cuda_max_allocated_bytes") if cuda else ("rss_bytes", "peak_rss_bytes")
        lines.append(f"| {t['target']} | {_s(t['e2e']['median'])} | {_s(t['e2e']['p90'])} | "
                     + (f"{t['speedup_vs_official']:.2f}x{baseline} | {_pixels(t['pixels_vs_official'])} | "
                        if official else "")
                     + f"{'%.2fx' % speed if speed else '–'} | {_rate(t['useful_flops_per_s_e2e'])} | "
                     f"{_s(t['warmup_seconds'][0]) if t['warmup_seconds'] else '–'} | {_s(t['load_seconds'])} | "
                     f"{_bytes(t['memory_after_load'].get(key))} | {_bytes(t['memory'].get(peak_key))} |")
    lines += ["", "## Per stage (median seconds; speed-up vs reference in parentheses)", "",
              "| target | " + " | ".join(STAGES) + " | other (host) |", "|---|" + "---:|" * (len(STAGES) + 1)]
    for t in report["targets"]:
        cells = []
        for s in (*STAGES, "other"):
            ratio = t.get("speedup_vs_reference", {}).get(s)
            cells.append(f"{_s(t['stages'][s]['median'])}" + (f" ({ratio:.2f}x)" if ratio and t["kind"] != "reference"
                                                              else ""))
        lines.append(f"| {t['target']} | " + " | ".join(cells) + " |")
    fl = report["flops"]
    lines += ["", "## Achieved throughput per stage", "",
              "FLOPs per request (NOVA_SPEC §6 formulas, benchmarks/flops.py): useful = the official algorithm; "
              "executed = the runner's graphs (spatial encoder half on the known tokens rounded up to a bucket of N/8, "
              "diffusion MLP on n_max rows, its condition projection once per mask step).", "",
              "| | " + " | ".join(STAGES) + " | total |", "|---|" + "---:|" * (len(STAGES) + 1),
              "| useful FLOPs | " + " | ".join(_flops(fl["useful"][s]) for s in STAGES)
              + f" | {_flops(sum(fl['useful'].values()))} |",
              "| executed FLOPs (runner) | " + " | ".join(_flops(fl["executed"][s]) for s in STAGES)
              + f" | {_flops(sum(fl['executed'].values()))} |",
              "| executed / useful | " + " | ".join(f"{fl['executed'][s] / fl['useful'][s]:.2f}" if fl["useful"][s] else "–"
                                                 for s in STAGES)
              + f" | {sum(fl['executed'].values()) / sum(fl['useful'].values()):.2f} |", "",
              "FLOP/s per stage: useful / executed (executed as a share of the measured matmul rate of the target's "
              "precision).", "",
              "| target | " + " | ".join(STAGES) + " |", "|---|" + "---:|" * len(STAGES)]
    for t in report["targets"]:
        cells = []
        for s in STAGES:
            th = t["throughput"][s]
            frac = th["executed_fraction_of_matmul"]
            cells.append(f"{_rate(th['useful_flops_per_s'])} / {_rate(th['executed_flops_per_s'])}"
                         + (f" ({100 * frac:.0f}%)" if frac else ""))
        lines.append(f"| {t['target']} | " + " | ".join(cells) + " |")
    lines += ["", "## Graph calls (runner targets; median over instrumented runs)", "",
              "compute floor = executed FLOPs per call at the measured matmul rate; above floor = dispatch overhead "
              "plus kernel inefficiency.", "",
              "| target | graph | calls | total s | per call | compute floor per call | above floor per call |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for t in report["targets"]:
        for name, o in (t.get("overhead") or {}).items():
            lines.append(f"| {t['target']} | {name} | {o['calls']} | {_s(o['total_seconds'])} | "
                         f"{_us(o['per_call_seconds'])} | {_us(o['compute_floor_seconds'])} | "
                         f"{_us(o['above_floor_seconds'])} |")
    for t in report["targets"]:  # ONNX Runtime's node placement (NOVA_ORT_PLACEMENT=1)
        if t.get("placement"):
            lines += ["", f"Node placement of {t['target']} (ONNX Runtime's verbose log at session creation):", ""]
            lines += [f"- {graph}: " + ", ".join(f"{n} on {ep}" for ep, n in p["nodes"].items())
                      + (f"; not on CUDA: {', '.join(p['not_on_cuda'])}" if p["not_on_cuda"] else "")
                      for graph, p in t["placement"].items()]
    ref = next((t for t in report["targets"] if t["kind"] == "reference"), None)
    if ref is not None:
        lines += ["", "Reference stage calls (one call = one stage entry: e.g. one `denoise` is the whole diffusion "
                      "loop of one mask step):", "",
                  "| stage | calls | total s | per call |", "|---|---:|---:|---:|"]
        for name, c in ref["graph_calls"].items():
            lines.append(f"| {name} | {c['calls']} | {_s(c['seconds_median'])} | {_us(c['per_call_seconds'])} |")
    return "\n".join(lines + common.markdown_footer(report))


def _pixels(difference: dict[str, Any]) -> str:
    if "error" in difference:
        return difference["error"]
    return (f"{difference['mean_abs_levels']:.2f} / {difference['max_abs_levels']} / "
            f"{100 * difference['share_above_1_level']:.1f} %")


def _us(value: float | None) -> str:
    if value is None:
        return "–"
    if abs(value) >= 1:
        return f"{value:.2f} s"
    if abs(value) >= 1e-3:
        return f"{value * 1e3:.2f} ms"
    return f"{value * 1e6:.0f} us"


def chart(report: dict[str, Any], path: Path) -> Path:
    from benchmarks.charts import stacked_bars

    env, ck, settings = report["environment"], report["checkpoint"], report["settings"]
    rows = []
    for t in report["targets"]:
        speed = t.get("speedup_vs_reference", {}).get("e2e")
        note = f"{t['e2e']['median']:.3g} s" + (f"  {speed:.2f}x" if speed and t["kind"] != "reference" else "")
        rows.append((t["target"], {s: t["stages"][s]["median"] for s in (*STAGES, "other")}, note))
    subtitle = (f"{env['device_name']}; {settings['num_inference_steps']}x{settings['num_diffusion_steps']} steps, "
                f"{settings['max_latent_length']} latent frame(s); median of {settings['repetitions']} runs; "
                f"{env['date'][:10]}, {env['git_commit'][:12]}")
    return stacked_bars(path, f"NOVA latency per stage: {ck['name']}", subtitle, rows, [*STAGES, "other"])


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    if not args.render and (args.repetitions < 1 or args.warmup < 0 or args.threads < 1):
        print("error: --repetitions and --threads must be >= 1, --warmup >= 0", file=sys.stderr)
        return 2
    return common.report_main(args, run_benchmark, markdown, chart, "latency", "## Per stage")


if __name__ == "__main__":
    sys.exit(main())
