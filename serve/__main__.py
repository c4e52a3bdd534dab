"""Start the NOVA Ray Serve application: `python -m serve --engines engines/tiny-t2i-fp16 --port 8000`.

Starts a local Ray instance, or joins the cluster named by RAY_ADDRESS (e.g. `ray start --head` first),
and serves until interrupted. The web demo is at / (http://127.0.0.1:8000/ by default).
"""

from __future__ import annotations

import argparse

from runtime.cli import HelpFormatter, add_version
from serve import jobs


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serve", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    add_version(p)
    p.add_argument("--engines", action="append", required=True, metavar="DIR",
                   help="an engine folder (export/build_engines.py); repeat for several models")
    p.add_argument("--host", default="127.0.0.1", help="HTTP address (0.0.0.0 to listen on every interface)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--backend", default="auto", help="NOVARunner.from_engines backend")
    p.add_argument("--device", default=None, help="NOVARunner.from_engines device (default: the backend's)")
    p.add_argument("--replicas", type=int, default=1, help="replicas per engine folder")
    p.add_argument("--num-cpus", type=float, default=1, help="CPUs per replica (Ray resources)")
    p.add_argument("--num-gpus", type=float, default=0, help="GPUs per replica (1: one replica per GPU)")
    p.add_argument("--max-ongoing-requests", type=int, default=32,
                   help="requests a replica holds at once (at least twice the engines' batch)")
    p.add_argument("--batch-wait-ms", type=float, default=20, help="longest wait for a batch to fill")
    p.add_argument("--max-jobs", type=int, default=jobs.MAX_JOBS,
                   help="video jobs held at once, queued, running or finished (POST /v1/videos/jobs)")
    p.add_argument("--job-keep-s", type=float, default=jobs.KEEP_S, help="how long a finished video job is kept")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    import ray
    from ray import serve

    from serve.app import build_app

    app = build_app(args.engines, backend=args.backend, device=args.device, num_replicas=args.replicas,
                    num_cpus=args.num_cpus, num_gpus=args.num_gpus, max_ongoing_requests=args.max_ongoing_requests,
                    batch_wait_s=args.batch_wait_ms / 1000, max_jobs=args.max_jobs, job_keep_s=args.job_keep_s)
    ray.init(include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app, name="nova", route_prefix="/", blocking=True)


if __name__ == "__main__":
    main()
