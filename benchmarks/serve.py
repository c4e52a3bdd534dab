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

Reports: <out>/<name>.json and <name>.md, by default benchmarks/results/<date>-<device>/serve-<checkpoint>.*.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

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
    p.add_argument("--out", default=None, help="report folder (default benchmarks/results/<date>-<device>/)")
    p.add_argument("--name", default=None, help="report name (default serve-<checkpoint>)")
    return p


def engine_folder(args) -> Path:
    if args.engines:
        return Path(args.engines)
    from export.build import BuildOptions, build
    from runtime.graphs.profile import BuildProfile

    checkpoint = common.resolve_checkpoint(None, args.variant)
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


def run_benchmark(args) -> dict[str, Any]:
    import ray
    import requests
    from ray import serve

    from runtime import NOVARunner
    from serve.app import build_app, model_id

    os.environ["NOVA_ORT_THREADS"] = str(args.threads)
    env = common.environment("cpu")
    folder = engine_folder(args)
    levels = [int(c) for c in args.concurrency.split(",")]
    options = {"num_inference_steps": args.steps, "num_diffusion_steps": args.diffusion_steps}

    def body(i: int) -> dict:
        return {"prompt": PROMPTS[i % len(PROMPTS)], "seed": i, **options}

    runner = NOVARunner.from_engines(folder)
    runner(**body(0))  # warm-up
    direct = [load(lambda i: runner(**body(i)), c, args.requests) for c in levels]
    del runner

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1/images"

    def post(i: int) -> None:
        response = requests.post(url, json=body(i), timeout=args.timeout)
        if response.status_code != 200:
            raise RuntimeError(f"request {i}: HTTP {response.status_code} {response.text}")

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app([str(folder)], env={"NOVA_ORT_THREADS": str(args.threads)}), name="nova", route_prefix="/")
        handle = serve.get_deployment_handle(model_id(folder), app_name="nova")
        post(0)  # warm-up
        served = []
        for c in levels:
            before = handle.stats.remote().result()
            served.append({**load(post, c, args.requests),
                           "runner_calls": handle.stats.remote().result()["runner_calls"] - before["runner_calls"]})
        build = handle.describe.remote().result()
    finally:
        serve.shutdown()
        ray.shutdown()
    env["load_average_at_end"] = common.load_average()
    return {"environment": env, "checkpoint": {"name": args.variant if not args.engines else folder.name},
            "engines": str(folder), "build": build, "options": options, "threads": args.threads,
            "direct": direct, "served": served}


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


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    report = run_benchmark(args)
    folder = common.results_folder("cpu", args.out)
    name = args.name or f"serve-{report['checkpoint']['name']}"
    common.write_json(folder / f"{name}.json", report)
    (folder / f"{name}.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {folder / name}.json, {folder / name}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
