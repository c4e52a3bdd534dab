"""Shared pieces of the benchmarks: benchmark checkpoints, the environment record, timing helpers.

Checkpoints: the released variants of `runtime.checkpoint` (tiny-t2i, tiny-t2v, d48w...), plus
benchmark-only synthetic configurations between "tiny" (per-call overhead only) and full size
(hours on a CPU), written in the same official layout with the same random-weight recipe by
`runtime.checkpoint.resolve_checkpoint(..., specs=bench_variants(), root=CHECKPOINT_ROOT)`.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from runtime.options import OPTIONS

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_ROOT = ROOT / "checkpoints" / "synthetic"
RESULTS_ROOT = ROOT / "benchmarks" / "results"


# ---------------------------------------------------------------------------------------------------
# Benchmark checkpoints
# ---------------------------------------------------------------------------------------------------
def bench_variants() -> dict[str, dict[str, Any]]:
    from runtime import checkpoint as ck

    small_phi = {**ck.PHI2_CONFIG, "hidden_size": 320, "intermediate_size": 1280, "num_hidden_layers": 4,
                 "num_attention_heads": 4, "num_key_value_heads": 4}  # head_dim 80 as Phi-2
    return {
        # 256x256 text-to-image: 256 image tokens, 64 video tokens, width 256, half the released depths
        # (8 temporal, 16 spatial, 3 MLP blocks), Phi with 4 layers of width 320, an SDXL-type VAE with
        # narrower channels. ~1 TF per image at 64 x 25 steps: seconds on a CPU, not milliseconds.
        "mid-t2i": {"scheduler": ck.FLOW_MATCH_SCHEDULER, "text_encoder": small_phi,
                    "vae": {**ck.SDXL_VAE_CONFIG, "block_out_channels": [32, 64, 128, 128], "layers_per_block": 1,
                            "sample_size": 256},
                    "transformer": ck.t2i_transformer_config(256, 256, depths=(8, 16, 3), text_dim=320)},
    }


def describe_variant(name: str) -> dict[str, Any] | None:
    """The configs of a benchmark-only variant (None for the runtime's own variants)."""
    return bench_variants().get(name)


# ---------------------------------------------------------------------------------------------------
# Environment record
# ---------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return f"{cpu_model()} ({os.cpu_count()} logical CPUs)"


def device_slug(device: str) -> str:
    """Short folder-name form of the device: cpu2 (2 CPUs), h100, h200, ..."""
    if device.startswith("cuda"):
        name = device_name(device).lower()
        for known in ("h200", "h100", "a100", "l40s", "l4", "a10"):
            if known in name:
                return known
        return "".join(c if c.isalnum() else "-" for c in name).strip("-")[:24] or "cuda"
    return f"cpu{os.cpu_count()}"


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("+dirty" if dirty else "") if commit else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def git_modified_files() -> list[str]:
    """Tracked files that differ from the commit (work in progress in a shared checkout)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10).stdout
        return [line[3:] for line in out.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError):
        return []


def versions() -> dict[str, str]:
    """The installed versions, read from package metadata: importing transformers and diffusers to ask them
    would cost a report's process ~5 s. A module's version is that of the first distribution on sys.path that
    installs it (onnxruntime's may be onnxruntime-gpu's)."""
    out = {"python": platform.python_version()}
    distributions = importlib.metadata.packages_distributions()
    for name in ("torch", "onnxruntime", "onnx", "numpy", "transformers", "diffusers"):
        try:
            out[name] = importlib.metadata.version(distributions.get(name, [name])[0])
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    try:
        import torch

        if torch.cuda.is_available():
            out["cuda"] = torch.version.cuda or "?"
            out["cudnn"] = str(torch.backends.cudnn.version())
    except ImportError:
        pass
    return out


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def gpu_details(device: str) -> dict[str, Any] | None:
    """Properties of the CUDA device and, where nvidia-smi answers, its driver, clocks and power limit."""
    if not device.startswith("cuda"):
        return None
    import torch

    props = torch.cuda.get_device_properties(torch.device(device))
    out: dict[str, Any] = {"name": props.name, "memory_bytes": props.total_memory,
                           "multiprocessors": props.multi_processor_count,
                           "compute_capability": f"{props.major}.{props.minor}"}
    try:
        fields = "driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu"
        line = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20).stdout.strip().splitlines()[0]
        out["nvidia_smi"] = dict(zip(fields.split(","), (v.strip() for v in line.split(","))))
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    return out


def environment(device: str, argv: list[str] | None = None) -> dict[str, Any]:
    now = datetime.datetime.now(datetime.timezone.utc)
    return {"date": now.isoformat(timespec="seconds"), "device": device, "device_name": device_name(device),
            "gpu": gpu_details(device), "host_cpu": cpu_model(), "logical_cpus": os.cpu_count(),
            "platform": platform.platform(), "versions": versions(), "git_commit": git_commit(),
            "git_modified_files": git_modified_files(),
            "command": " ".join([Path(sys.executable).name, *(argv if argv is not None else sys.argv)]),
            "load_average_at_start": load_average()}


def results_folder(device: str, out: str | None = None) -> Path:
    if out:
        return Path(out)
    return RESULTS_ROOT / f"{datetime.date.today().isoformat()}-{device_slug(device)}"


# ---------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------
def peak_rss_bytes() -> int:
    """High-water resident set size of this process: VmHWM on Linux. (Not ru_maxrss: Linux carries it
    over an exec, so a fresh worker would report the larger RSS of the parent it was forked from.)"""
    hwm = _proc_status_bytes("VmHWM:")
    if hwm:
        return hwm
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _proc_status_bytes(field: str, pid: int | str = "self") -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def current_rss_bytes(pid: int | str = "self") -> int:
    """Resident set size now of this process, or of another one on this machine (0 where unknown)."""
    return _proc_status_bytes("VmRSS:", pid)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) without numpy."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(values: list[float]) -> dict[str, float]:
    return {"median": percentile(values, 50), "p90": percentile(values, 90), "min": min(values), "max": max(values),
            "n": len(values)}


def matmul_rate(device: str, dtype_name: str, size: int | None = None, seconds: float = 1.0) -> dict[str, Any]:
    """Measured dense matrix-multiply rate (FLOP/s) of torch on this device: the ceiling the stage
    rates are compared with. CPU: one size x size fp32 product at the current thread count; GPU: an
    8192^3 product timed with CUDA events over rotating inputs (median)."""
    import torch

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "tf32": torch.float32}[dtype_name]
    cuda = device.startswith("cuda")
    size = size or (8192 if cuda else 1024)
    generator = torch.Generator(device=device).manual_seed(0)
    pairs = [(torch.randn(size, size, device=device, generator=generator).to(dtype),
              torch.randn(size, size, device=device, generator=generator).to(dtype)) for _ in range(3 if cuda else 1)]
    previous_tf32 = torch.backends.cuda.matmul.allow_tf32 if cuda else None
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = dtype_name == "tf32"
    try:
        for a, b in pairs:  # warm-up
            a @ b
        if cuda:
            torch.cuda.synchronize()
        times, deadline = [], time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(times) < 5:
            a, b = pairs[len(times) % len(pairs)]
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                a @ b
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                start = time.perf_counter()
                a @ b
                times.append(time.perf_counter() - start)
    finally:
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = previous_tf32
    median = percentile(times, 50)
    return {"dtype": dtype_name, "size": size, "flops_per_s": 2.0 * size ** 3 / median, "median_s": median,
            "runs": len(times), "threads": torch.get_num_threads() if not cuda else None}


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    tmp.replace(path)
    return path


def _json_default(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serializable: {type(value).__name__}")


def markdown_header(title: str, report: dict) -> list[str]:
    """A report's first lines: title, then when, at which commit, by which command, with which versions."""
    env = report["environment"]
    return [f"# {title}: {report['checkpoint']['name']} on {env['device_name']}", "",
            f"- date: {env['date']}; git commit `{env['git_commit']}`"
            + (f" (modified: {', '.join(env['git_modified_files'])})" if env.get("git_modified_files") else ""),
            f"- command: `{env['command']}`",
            "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items())]


def markdown_footer(report: dict) -> list[str]:
    """A report's last lines: the engine builds the run made, and its wall time."""
    lines = []
    if report["engine_builds"]:
        lines += ["", "Engine builds in this run: " + "; ".join(
            f"{b['target']} {b['seconds']:.0f} s ({b['exporter']})" + (f" -> `{b['folder']}`" if "folder" in b else "")
            for b in report["engine_builds"])]
    return lines + ["", f"Whole benchmark: {report['wall_seconds']:.0f} s wall.", ""]


def write_reports(report: dict, folder: Path, name: str, markdown, chart) -> dict[str, Path]:
    """A report as <name>.json, <name>.md (markdown(report)) and <name>.png (chart(report, path))."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": write_json(folder / f"{name}.json", report), "md": folder / f"{name}.md",
             "png": folder / f"{name}.png"}
    paths["md"].write_text(markdown(report))
    chart(report, paths["png"])
    return paths


DEFAULT_PROMPT = "a corgi wearing sunglasses on a beach at sunset"


def comparison_parser(kind: str, doc: str, targets_help: str) -> argparse.ArgumentParser:
    """The arguments of the scripts that compare targets on one request (latency.py, parity.py): the checkpoint,
    the targets and their engines, the request, threads, and where the report goes (`report_main`). Each script
    adds its own."""
    p = argparse.ArgumentParser(prog=f"python benchmarks/{kind}.py", description=doc.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", metavar="DIR", help="a NOVA checkpoint folder")
    source.add_argument("--variant", default="mid-t2i",
                        help="synthetic variant (runtime variants or benchmark ones: mid-t2i), written to "
                             "checkpoints/synthetic/ on first use")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--targets", default=None, help=targets_help)
    p.add_argument("--engines", metavar="[PRECISION=]DIR", action="append", default=[],
                   help="use this engine folder for the engine targets of that precision instead of building one")
    p.add_argument("--engines-root", type=Path, default=ROOT / "engines",
                   help="where engines built by this run go (bench-<checkpoint>-<precision>; reused when unchanged)")
    p.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo", help="exporter for built engines")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=OPTIONS["num_inference_steps"].default,
                   help="mask steps (num_inference_steps)")
    p.add_argument("--diffusion-steps", type=int, default=OPTIONS["num_diffusion_steps"].default,
                   help="num_diffusion_steps")
    p.add_argument("--frames", type=int, default=1, help="latent frames (max_latent_length); 9 = 33 video frames")
    p.add_argument("--guidance-scale", type=float, default=OPTIONS["guidance_scale"].default)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads per target (torch and ONNX Runtime alike); 1 suits a shared 2-core machine")
    p.add_argument("--out", metavar="DIR", help="results folder (default benchmarks/results/<date>-<device>)")
    p.add_argument("--name", help=f"report file name without extension (default {kind}-<checkpoint>)")
    p.add_argument("--render", metavar="JSON", help="only rewrite the Markdown and PNG of an existing report")
    return p


def report_main(args, run, markdown, chart, kind: str, summary_until: str) -> int:
    """The end of a benchmark's main(): `--render JSON` rewrites an existing report's Markdown and PNG;
    otherwise run(args) and write <kind>-<checkpoint> reports, printing the Markdown up to `summary_until`."""
    if args.render:
        path = Path(args.render)
        paths = write_reports(json.loads(path.read_text()), path.parent, path.stem, markdown, chart)
    else:
        try:
            report = run(args)
        except (ValueError, RuntimeError, OSError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        paths = write_reports(report, results_folder(args.device, args.out),
                              args.name or f"{kind}-{report['checkpoint']['name']}", markdown, chart)
        print(paths["md"].read_text().split(summary_until)[0])
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
