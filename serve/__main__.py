"""Start the NOVA Ray Serve application: `python -m serve --engines engines/tiny-t2i-fp16 --port 8000`.

Starts a local Ray instance (on the CPUs this process may run on), or joins the cluster named by RAY_ADDRESS
(e.g. `ray start --head` first), and serves until stopped. Every engine folder is verified, and the plan checked
against the cluster's CPUs and GPUs, before any replica starts (a local instance's CPUs before it starts).
Exit status: 0 stopped by SIGTERM, 2 refused, 130 interrupted (Ctrl-C). The web demo is at /
(http://127.0.0.1:8000/ by default).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time

from runtime.backends import BACKENDS
from runtime.cli import HelpFormatter, add_version
from serve import defaults


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serve", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    add_version(p)
    p.add_argument("--engines", action="append", required=True, metavar="DIR",
                   help="an engine folder (export/build_engines.py); repeat for several models")
    p.add_argument("--host", default="127.0.0.1", help="HTTP address (0.0.0.0 to listen on every interface)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="port of Ray's Prometheus metrics (default: a free one, printed at start); on 127.0.0.1 when "
                        "--host is, else on every interface; a local Ray instance only")
    p.add_argument("--backend", default="auto", choices=("auto", *BACKENDS), help="NOVARunner.from_engines backend")
    p.add_argument("--device", default=None, help="NOVARunner.from_engines device (default: the backend's)")
    p.add_argument("--replicas", type=int, default=1, help="replicas per engine folder")
    p.add_argument("--num-cpus", type=float, default=defaults.NUM_CPUS, help="CPUs per replica (Ray resources)")
    p.add_argument("--num-gpus", type=float, default=0, help="GPUs per replica (1: one replica per GPU)")
    p.add_argument("--max-ongoing-requests", type=int, default=defaults.MAX_ONGOING_REQUESTS,
                   help="requests a replica holds at once (at least twice the engines' batch)")
    p.add_argument("--max-queued-requests", type=int, default=defaults.MAX_QUEUED_REQUESTS,
                   help="requests a model queues when its replicas are full; beyond: 503 with Retry-After")
    p.add_argument("--batch-wait-ms", type=float, default=defaults.BATCH_WAIT_S * 1000,
                   help="longest wait for a batch to fill")
    p.add_argument("--image-deadline-s", type=float, default=defaults.DEADLINE_S["image"],
                   help="seconds an image request may take from arrival (then 504, and its generation stops)")
    p.add_argument("--video-deadline-s", type=float, default=defaults.DEADLINE_S["video"],
                   help="seconds a video request may take from arrival (then 504, or an error event mid-stream)")
    p.add_argument("--max-jobs", type=int, default=defaults.MAX_JOBS,
                   help="video jobs held at once, queued, running or finished (POST /v1/videos/jobs)")
    p.add_argument("--job-keep-s", type=float, default=defaults.JOB_KEEP_S,
                   help="how long a finished video job is kept")
    return p


class _Stopped(Exception):
    """SIGTERM or SIGINT arrived: stop serving and exit with `code`."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.code = 0 if signum == signal.SIGTERM else 130


def _stop(signum: int, frame) -> None:
    raise _Stopped(signum)


def _on_signals(handler) -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handler)


def _refuse(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _verified(folders: list[str], backend: str) -> str | None:
    """The first engine folder's problem (missing, partial, edited after the build), before Ray starts."""
    from runtime.engine_folder import EngineFolder, ManifestError

    for folder in folders:
        try:
            EngineFolder.open(folder, engines=backend == "tensorrt")
        except ManifestError as error:
            return str(error)
    return None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if os.environ.get("RAY_ADDRESS") and args.metrics_port is not None:
        return _refuse("--metrics-port sets a local Ray instance's port; the cluster at RAY_ADDRESS has its own "
                       "(`ray start --metrics-export-port`)")
    problem = _verified(args.engines, args.backend)
    if problem:
        return _refuse(problem)
    _on_signals(_stop)  # from here on a signal unwinds to the shutdown in _serve
    try:
        return _serve(args)
    except _Stopped as stopped:
        print("stopped" if stopped.code == 0 else "interrupted", file=sys.stderr, flush=True)
        return stopped.code


def _serve(args: argparse.Namespace) -> int:
    """Deploy and serve until a signal (`_Stopped`); 2 for a plan the cluster cannot hold."""
    if not os.environ.get("RAY_ADDRESS") and args.host in ("127.0.0.1", "localhost"):
        # a one-machine Ray on the loopback address: its metrics agent then listens on 127.0.0.1, not on every
        # interface (Ray reads this before it is imported)
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray import serve

    from serve.app import build_app, model_id, unschedulable

    try:
        app = build_app(args.engines, backend=args.backend, device=args.device, num_replicas=args.replicas,
                        num_cpus=args.num_cpus, num_gpus=args.num_gpus, max_ongoing_requests=args.max_ongoing_requests,
                        max_queued_requests=args.max_queued_requests, batch_wait_s=args.batch_wait_ms / 1000,
                        deadlines_s={"image": args.image_deadline_s, "video": args.video_deadline_s},
                        max_jobs=args.max_jobs, job_keep_s=args.job_keep_s)
    except ValueError as error:
        return _refuse(str(error))
    plan = (len(args.engines), args.replicas, args.num_cpus, args.num_gpus)
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        # a local instance gets the CPUs this process may run on, so a plan beyond them is refused before it
        # starts (its GPUs are Ray's to detect: checked below)
        cpus = len(os.sched_getaffinity(0))
        problem = unschedulable({"CPU": cpus, "GPU": math.inf}, *plan)
        if problem:
            return _refuse(problem)
        ray.init(num_cpus=cpus, include_dashboard=False, _metrics_export_port=args.metrics_port)
    _on_signals(_stop)  # Ray installs handlers of its own
    problem = unschedulable(ray.cluster_resources(), *plan)
    if problem:
        ray.shutdown()
        return _refuse(problem)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app, name="nova", route_prefix="/", blocking=False)
        node = next(n for n in ray.nodes() if n["NodeID"] == ray.get_runtime_context().get_node_id())
        print(f"serving {', '.join(model_id(folder) for folder in args.engines)} on http://{args.host}:{args.port}; "
              f"Ray's Prometheus metrics on http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics",
              flush=True)
        while True:  # a signal may reach one of Ray's threads: the handler runs once this thread wakes
            time.sleep(0.5)
    finally:
        _on_signals(signal.SIG_IGN)  # a second signal must not interrupt the shutdown
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
