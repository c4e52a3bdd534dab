"""Serving benchmark: requests/s and latency of the Ray Serve application against direct runner calls.

    python benchmarks/serve.py --variant tiny-t2i                    # batch-4 fp32 engines built on first use
    python benchmarks/serve.py --engines engines/my-build --concurrency 1,8,32 --requests 64

At each concurrency c, c client threads send `--requests` image requests in all (one prompt, one image,
a seed each):
- direct: the threads call one in-process NOVARunner (calls are serialized by the runner; no batching);
- served: the threads POST to /v1/images of `serve.app` on a local Ray instance (one replica, loopback HTTP),
  which batches compatible requests up to the engines' built batch.
Latency is per request, from the call (or the POST) to the decoded image (or the PNG bytes); requests/s
is requests over the wall time of the level. Both sides run ONNX Runtime on `--threads` threads.

`--soak-s S` replaces the levels by a soak and a fault under load, against the application only:
- soak: the first --concurrency level of client threads sends requests back to back for S seconds: requests/s,
  p50/p95/p99 latency, non-200 answers, and the replica's RSS every --sample-s (growth measured after --warmup-s);
- kill: the same load for --before-kill-s, then the replica is killed (Ray restarts it), and the load goes on
  for --after-kill-s: every request in flight at the kill must get 503 or its exact image (checked against a
  direct call), none may take longer than the deadline (--deadline-s, the application's image deadline), and
  the recovery time is from the kill to the first image answered to a request sent after it.

Reports: <out>/<name>.json and <name>.md, by default benchmarks/results/<date>-<device>/serve-<checkpoint>.*
(serve-soak-<checkpoint>.* for --soak-s).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import itertools
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

PROMPTS = ("a corgi wearing sunglasses on a beach at sunset", "a lighthouse at dusk", "a red kite over hills",
           "a bowl of ramen")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/serve.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--engines", metavar="DIR", help="an image engine folder (default: built from --variant)")
    source.add_argument("--variant", default="tiny-t2i", help="synthetic image variant to build engines for")
    p.add_argument("--batch", type=int, default=4, help="prompts per call of the engines built from --variant")
    p.add_argument("--engines-root", type=Path, default=common.ROOT / "engines",
                   help="where built engines go (bench-serve-<variant>-b<batch>; reused when unchanged)")
    p.add_argument("--concurrency", default="1,4,16", help="comma list of client threads")
    p.add_argument("--requests", type=int, default=48, help="requests per concurrency level and side")
    p.add_argument("--steps", type=int, default=64, help="num_inference_steps")
    p.add_argument("--diffusion-steps", type=int, default=25, help="num_diffusion_steps")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads, direct and per replica")
    p.add_argument("--timeout", type=float, default=120, help="seconds for any one request")
    p.add_argument("--soak-s", type=float, default=None, help="run the soak and the replica kill instead of the levels")
    p.add_argument("--warmup-s", type=float, default=60, help="soak seconds before RSS growth is measured")
    p.add_argument("--sample-s", type=float, default=10, help="seconds between RSS samples of the replica")
    p.add_argument("--before-kill-s", type=float, default=15, help="load before the replica is killed")
    p.add_argument("--after-kill-s", type=float, default=45, help="load after the replica is killed")
    p.add_argument("--deadline-s", type=float, default=30, help="the application's image deadline (soak)")
    p.add_argument("--out", default=None, help="report folder (default benchmarks/results/<date>-<device>/)")
    p.add_argument("--name", default=None, help="report name (default serve-<checkpoint>)")
    return p


def engine_folder(args) -> Path:
    if args.engines:
        return Path(args.engines)
    from export.build import BuildOptions, build
    from runtime.checkpoint import resolve_checkpoint
    from runtime.graphs.profile import BuildProfile

    checkpoint = resolve_checkpoint(None, args.variant, specs=common.bench_variants(), root=common.CHECKPOINT_ROOT)
    out = args.engines_root / f"bench-serve-{args.variant}-b{args.batch}"
    build(BuildOptions(checkpoint=checkpoint, out=out, precision="fp32", progress=False,
                       profile=BuildProfile(prompts=args.batch, min_mask_steps=min(args.steps, 64))),
          report=lambda message: print(message, file=sys.stderr))
    return out


def load(send: Callable[[int], None], concurrency: int, count: int) -> dict[str, Any]:
    """`count` requests from `concurrency` threads -> requests/s and latency percentiles (seconds)."""
    latencies: list[float] = []

    def one(i: int) -> None:
        start = time.perf_counter()
        send(i)
        latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(count)))
    wall = time.perf_counter() - start
    return {"concurrency": concurrency, "requests": count, "wall_s": wall, "requests_per_s": count / wall,
            "p50_s": common.percentile(latencies, 50), "p99_s": common.percentile(latencies, 99),
            "latencies_s": latencies}


def body(options: dict, i: int) -> dict:
    return {"prompt": PROMPTS[i % len(PROMPTS)], "seed": i, **options}


@contextlib.contextmanager
def served(folder: Path, args, options: dict, **app_options) -> Iterator[tuple[str, Any]]:
    """The application over `folder` on a local Ray instance (one replica, loopback HTTP) -> (its /v1/images
    URL, the model's deployment handle); warmed up with one request."""
    import ray
    import requests
    from ray import serve

    from serve.app import build_app, model_id

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app([str(folder)], env={"NOVA_ORT_THREADS": str(args.threads)}, **app_options), name="nova",
                  route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1/images"
        requests.post(url, json=body(options, 0), timeout=args.timeout).raise_for_status()
        yield url, serve.get_deployment_handle(model_id(folder), app_name="nova")
    finally:
        serve.shutdown()
        ray.shutdown()


def run_benchmark(args) -> dict[str, Any]:
    import requests

    from runtime import NOVARunner

    os.environ["NOVA_ORT_THREADS"] = str(args.threads)
    env = common.environment("cpu")
    folder = engine_folder(args)
    levels = [int(c) for c in args.concurrency.split(",")]
    options = {"num_inference_steps": args.steps, "num_diffusion_steps": args.diffusion_steps}

    runner = NOVARunner.from_engines(folder)
    runner(**body(options, 0))  # warm-up
    direct = [load(lambda i: runner(**body(options, i)), c, args.requests) for c in levels]
    del runner

    with served(folder, args, options) as (url, handle):
        def post(i: int) -> None:
            response = requests.post(url, json=body(options, i), timeout=args.timeout)
            if response.status_code != 200:
                raise RuntimeError(f"request {i}: HTTP {response.status_code} {response.text}")

        served_levels = []
        for c in levels:
            before = handle.stats.remote().result()
            served_levels.append({**load(post, c, args.requests),
                                  "runner_calls": handle.stats.remote().result()["runner_calls"] - before["runner_calls"]})
        build = handle.describe.remote().result()
    env["load_average_at_end"] = common.load_average()
    return {"environment": env, "checkpoint": {"name": args.variant if not args.engines else folder.name},
            "engines": str(folder), "build": build, "options": options, "threads": args.threads,
            "direct": direct, "served": served_levels}


class SteadyLoad:
    """`concurrency` client threads sending requests back to back until `stop()`; every request recorded as
    {"index", "start", "end" (monotonic seconds), "status" (HTTP status, or the client's exception), "png"}."""

    def __init__(self, url: str, options: dict, concurrency: int, timeout: float, keep_png: bool):
        self.url, self.options, self.timeout, self.keep_png = url, options, timeout, keep_png
        self.records: list[dict[str, Any]] = []
        self._indices, self._stopping = itertools.count(1), threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(concurrency)]
        for thread in self._threads:
            thread.start()

    def _client(self) -> None:
        import requests

        with requests.Session() as session:
            while not self._stopping.is_set():
                i, start = next(self._indices), time.monotonic()
                try:
                    response = session.post(self.url, json=body(self.options, i), timeout=self.timeout)
                    status, png = response.status_code, response.content if response.status_code == 200 else None
                except requests.RequestException as error:
                    status, png = type(error).__name__, None
                self.records.append({"index": i, "start": start, "end": time.monotonic(), "status": status,
                                     "png": png if self.keep_png else None})

    def stop(self) -> list[dict[str, Any]]:
        self._stopping.set()
        for thread in self._threads:
            thread.join(self.timeout + 5)
        return sorted(self.records, key=lambda record: record["start"])


def _statuses(records: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in records:
        counts[str(record["status"])] = counts.get(str(record["status"]), 0) + 1
    return counts


def _replica_name(folder: Path) -> str:
    import ray

    from serve.app import model_id

    names = [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
             if actor["namespace"] == "serve" and f"nova#{model_id(folder)}#" in actor["name"]]
    if len(names) != 1:
        raise RuntimeError(f"expected one replica of {model_id(folder)}, found {names}")
    return names[0]


def soak(url: str, handle, args, options: dict, concurrency: int) -> dict[str, Any]:
    """Steady load for args.soak_s: throughput, latency percentiles, answers, the replica's RSS over time."""
    pid, samples = handle.stats.remote().result()["pid"], []
    start = time.monotonic()
    steady = SteadyLoad(url, options, concurrency, args.timeout, keep_png=False)
    while (elapsed := time.monotonic() - start) < args.soak_s:
        samples.append({"t_s": round(elapsed, 1), "rss_bytes": common.current_rss_bytes(pid)})
        time.sleep(min(args.sample_s, max(args.soak_s - elapsed, 0.01)))
    records = steady.stop()
    wall = time.monotonic() - start
    samples.append({"t_s": round(wall, 1), "rss_bytes": common.current_rss_bytes(pid)})
    latencies = [r["end"] - r["start"] for r in records if r["status"] == 200]
    warm = [s["rss_bytes"] for s in samples if s["t_s"] >= args.warmup_s]
    return {"seconds": wall, "concurrency": concurrency, "requests": len(records), "answers": _statuses(records),
            "errors": sum(r["status"] != 200 for r in records), "requests_per_s": len(latencies) / wall,
            "p50_s": common.percentile(latencies, 50), "p95_s": common.percentile(latencies, 95),
            "p99_s": common.percentile(latencies, 99), "max_s": max(latencies, default=float("nan")),
            "replica_pid": pid, "rss": samples, "warmup_s": args.warmup_s,
            "rss_growth_after_warmup": (warm[-1] - warm[0]) / warm[0] if len(warm) > 1 and warm[0] else None}


def kill_under_load(url: str, folder: Path, args, options: dict, concurrency: int) -> dict[str, Any]:
    """The replica killed under steady load: what the requests in flight got, the longest request, and the
    time until a request sent after the kill was answered with an image."""
    import ray

    steady = SteadyLoad(url, options, concurrency, args.timeout, keep_png=True)
    time.sleep(args.before_kill_s)
    killed = time.monotonic()
    ray.kill(ray.get_actor(_replica_name(folder), namespace="serve"), no_restart=True)
    time.sleep(args.after_kill_s)
    records = steady.stop()
    in_flight = [r for r in records if r["start"] < killed < r["end"]]
    after = [r["end"] - killed for r in records if r["start"] > killed and r["status"] == 200]
    return {"concurrency": concurrency, "before_kill_s": args.before_kill_s, "after_kill_s": args.after_kill_s,
            "requests": len(records), "answers": _statuses(records), "in_flight": in_flight,
            "in_flight_answers": _statuses(in_flight), "deadline_s": args.deadline_s,
            "longest_s": max(r["end"] - r["start"] for r in records),
            "recovery_s": min(after) if after else None}


def run_soak(args) -> dict[str, Any]:
    from PIL import Image

    from runtime import NOVARunner

    os.environ["NOVA_ORT_THREADS"] = str(args.threads)
    env = common.environment("cpu")
    folder = engine_folder(args)
    concurrency = int(args.concurrency.split(",")[0])
    options = {"num_inference_steps": args.steps, "num_diffusion_steps": args.diffusion_steps}
    with served(folder, args, options, deadlines_s={"image": args.deadline_s, "video": args.deadline_s}) as (url, handle):
        soaked = soak(url, handle, args, options, concurrency)
        build = handle.describe.remote().result()
        killed = kill_under_load(url, folder, args, options, concurrency)
    runner = NOVARunner.from_engines(folder)  # after Ray: the in-flight images against their direct calls
    for record in killed["in_flight"]:
        png = record.pop("png")
        if record["status"] == 200:
            served_image = np.asarray(Image.open(io.BytesIO(png)))
            record["exact"] = bool(np.array_equal(served_image, runner(**body(options, record["index"])).images[0]))
    env["load_average_at_end"] = common.load_average()
    return {"environment": env, "checkpoint": {"name": args.variant if not args.engines else folder.name},
            "engines": str(folder), "build": build, "options": options, "threads": args.threads,
            "soak": soaked, "kill": killed}


def markdown(report: dict) -> str:
    o = report["options"]
    lines = [*common.markdown_header("Serving", report),
             f"- engines: `{report['engines']}`: {report['build']['build']}",
             f"- requests: one prompt, one image, a seed each; {o['num_inference_steps']} mask x "
             f"{o['num_diffusion_steps']} diffusion steps; ONNX Runtime on {report['threads']} thread(s) per side",
             f"- load average at start / end: {report['environment']['load_average_at_start']} / "
             f"{report['environment'].get('load_average_at_end')}", "",
             "| concurrency | requests | direct req/s | served req/s | direct p50 | served p50 | direct p99 | served p99 "
             "| served runner calls |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for d, s in zip(report["direct"], report["served"]):
        lines.append(f"| {d['concurrency']} | {d['requests']} | {d['requests_per_s']:.1f} | {s['requests_per_s']:.1f} | "
                     f"{d['p50_s'] * 1e3:.0f} ms | {s['p50_s'] * 1e3:.0f} ms | {d['p99_s'] * 1e3:.0f} ms | "
                     f"{s['p99_s'] * 1e3:.0f} ms | {s['runner_calls']} |")
    lines += ["", "Direct: threads calling one in-process runner (one call per request). Served: HTTP over loopback "
              "to one replica, which batches compatible requests into one runner call; latency includes JSON, "
              "HTTP, Ray's proxy, the ingress, the batch wait and PNG encoding.", ""]
    return "\n".join(lines)


def soak_markdown(report: dict) -> str:
    o, soaked, killed = report["options"], report["soak"], report["kill"]
    growth = soaked["rss_growth_after_warmup"]
    exact = [r.get("exact") for r in killed["in_flight"] if r["status"] == 200]
    lines = [*common.markdown_header("Serving soak", report),
             f"- engines: `{report['engines']}`: {report['build']['build']}",
             f"- requests: one prompt, one image, a seed each; {o['num_inference_steps']} mask x "
             f"{o['num_diffusion_steps']} diffusion steps; ONNX Runtime on {report['threads']} thread(s) per replica",
             f"- load average at start / end: {report['environment']['load_average_at_start']} / "
             f"{report['environment'].get('load_average_at_end')}", "",
             f"## Soak: {soaked['seconds']:.0f} s at concurrency {soaked['concurrency']}", "",
             f"- {soaked['requests']} requests, answers {soaked['answers']}, {soaked['errors']} not 200",
             f"- {soaked['requests_per_s']:.1f} requests/s; latency p50 {soaked['p50_s'] * 1e3:.0f} ms, p95 "
             f"{soaked['p95_s'] * 1e3:.0f} ms, p99 {soaked['p99_s'] * 1e3:.0f} ms, max {soaked['max_s'] * 1e3:.0f} ms",
             f"- replica RSS growth from {soaked['warmup_s']:.0f} s to the end: "
             + (f"{growth * 100:+.2f} %" if growth is not None else "not measured"), "",
             "| t (s) | replica RSS (MiB) |", "|---:|---:|",
             *(f"| {s['t_s']:.0f} | {s['rss_bytes'] / 2 ** 20:.1f} |" for s in soaked["rss"]), "",
             f"## Replica killed under load (concurrency {killed['concurrency']}, {killed['before_kill_s']:.0f} s "
             f"before, {killed['after_kill_s']:.0f} s after)", "",
             f"- {killed['requests']} requests, answers {killed['answers']}",
             f"- in flight at the kill: {len(killed['in_flight'])}, answers {killed['in_flight_answers']}; images "
             f"equal to their direct call: {sum(bool(e) for e in exact)} of {len(exact)}",
             f"- longest request: {killed['longest_s']:.1f} s (deadline {killed['deadline_s']:.0f} s)",
             "- recovery (kill to the first image for a request sent after it): "
             + (f"{killed['recovery_s']:.1f} s" if killed["recovery_s"] is not None else "none within the run"), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    report, render = (run_soak(args), soak_markdown) if args.soak_s else (run_benchmark(args), markdown)
    folder = common.results_folder("cpu", args.out)
    name = args.name or f"serve-{'soak-' if args.soak_s else ''}{report['checkpoint']['name']}"
    common.write_json(folder / f"{name}.json", report)
    (folder / f"{name}.md").write_text(render(report))
    print(render(report))
    print(f"wrote {folder / name}.json, {folder / name}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
