"""`python -m serve` as a user runs it, in subprocesses on 127.0.0.1: refusals before Ray places anything,
serving with torch absent from every process, the metrics port, and clean stops on SIGTERM and Ctrl-C."""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from runtime import NOVARunner
from runtime.draws import NumpyDraws
from tests import NO_TORCH
from tests.service.apps import free_port

pytest.importorskip("ray", reason="ray[serve] is not installed (pip install -e '.[serve]')")

ROOT = Path(__file__).resolve().parents[1]
STEPS = dict(num_inference_steps=8, num_diffusion_steps=4)
START_S = 180  # a Ray instance and a replica starting on 2 shared cores


def _serve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serve", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_broken_engine_folder_is_refused_in_one_sentence_before_ray(t2i_engines, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(t2i_engines, broken)
    graph = broken / json.loads((broken / "manifest.json").read_text())["components"]["spatial"]["artifacts"][0]["file"]
    size = graph.stat().st_size
    graph.write_bytes(graph.read_bytes()[: size // 2])
    started = time.monotonic()
    result = _serve("--engines", str(broken), "--port", str(free_port()))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: {broken}: graph spatial: {graph.name} was modified after the build "
                                          f"(size {size // 2}, recorded {size}); "
                                          f"rebuild with export/build_engines.py"], result.stderr
    assert time.monotonic() - started < 30  # no Ray instance was started


def test_plan_beyond_the_cluster_is_refused_before_deploying(t2i_engines, t2i_b4_engines, t2v_engines):
    """Three folders at half the machine's CPUs each cannot all be placed: refused in one sentence naming the
    flags (it waited forever for resources before), before a local Ray instance starts."""
    half = len(os.sched_getaffinity(0)) / 2
    result = _serve("--engines", str(t2i_engines), "--engines", str(t2i_b4_engines), "--engines", str(t2v_engines),
                    "--num-cpus", str(half), "--port", str(free_port()))
    assert result.returncode == 2, result.stderr
    last = result.stderr.splitlines()[-1]
    assert re.fullmatch(rf"error: 3 engine folder\(s\) x --replicas 1 x --num-cpus {half:g} need {3 * half:g} CPUs but "
                        r"the cluster has [\d.]+: lower --num-cpus or --replicas, or serve fewer --engines", last), last
    assert "Traceback" not in result.stderr and "Started a local Ray instance" not in result.stderr


class Service:
    """A `python -m serve` process: its URL, its metrics URL (as printed) and its output files."""

    def __init__(self, folder: Path, logs: Path, env: dict[str, str]):
        self.port, self.metrics_port = free_port(), free_port()
        self.stdout, self.stderr = logs / "stdout.txt", logs / "stderr.txt"
        with open(self.stdout, "w") as out, open(self.stderr, "w") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "serve", "--engines", str(folder), "--port", str(self.port),
                 "--metrics-port", str(self.metrics_port), "--num-cpus", "0.5"],
                cwd=ROOT, stdout=out, stderr=err, env=env)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_serving(self, deadline: float) -> str:
        """The line saying what it serves, once it does."""
        while time.monotonic() < deadline and self.process.poll() is None:
            lines = [line for line in self.stdout.read_text().splitlines() if line.startswith("serving ")]
            if lines:
                return lines[0]
            time.sleep(0.5)
        raise AssertionError(f"not serving (exit {self.process.poll()}): {self.stderr.read_text()[-3000:]}")

    def stop(self, signum: int) -> tuple[int, str]:
        self.process.send_signal(signum)
        return self.process.wait(timeout=60), self.stderr.read_text()


@pytest.fixture(scope="module")
def services(t2i_b4_engines, tmp_path_factory):
    """Two services started at once (one Ray instance each, to share the start-up wait), torch blocked in both."""
    blocker = tmp_path_factory.mktemp("no-torch")
    (blocker / "sitecustomize.py").write_text(NO_TORCH)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(ROOT)]), "NOVA_ORT_THREADS": "1"}
    started = [Service(t2i_b4_engines, tmp_path_factory.mktemp(f"service{i}"), env) for i in range(2)]
    try:
        deadline = time.monotonic() + START_S
        yield [(service, service.wait_serving(deadline)) for service in started]
    finally:
        for service in started:
            if service.process.poll() is None:
                service.process.kill()
                service.process.wait(timeout=60)


def _png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)))


def test_serves_without_torch_and_stops_cleanly_on_sigterm(services, t2i_b4_engines):
    """Batched rows and a call of its own draw from numpy (torch is absent): each equals the direct call with
    NumpyDraws(seed). The metrics port is the one asked for, on 127.0.0.1. SIGTERM: exit 0, no stack dump."""
    import requests

    service, line = services[0]
    assert line == (f"serving t2i-b4 on {service.url}; Ray's Prometheus metrics on "
                    f"http://127.0.0.1:{service.metrics_port}/metrics")
    bodies = [{"prompt": f"no torch {i}", "seed": 30 + i, **STEPS} for i in range(3)]
    bodies.append({"prompt": "two", "seed": 40, "num_images_per_prompt": 2, **STEPS})
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda body: requests.post(f"{service.url}/v1/images", json=body, timeout=60),
                                  bodies))
    assert [r.status_code for r in responses] == [200] * len(bodies), [r.text for r in responses]
    runner = NOVARunner.from_engines(t2i_b4_engines)
    for body, response in zip(bodies[:3], responses):
        np.testing.assert_array_equal(_png(response.content),
                                      runner(body["prompt"], draws=NumpyDraws(body["seed"]), **STEPS).images[0])
    served = np.stack([_png(__import__("base64").b64decode(image)) for image in responses[3].json()["images"]])
    np.testing.assert_array_equal(served, runner("two", draws=NumpyDraws(40), num_images_per_prompt=2, **STEPS).images)
    assert requests.get(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=10).status_code == 200

    code, stderr = service.stop(signal.SIGTERM)
    assert code == 0 and stderr.splitlines()[-1] == "stopped", stderr[-3000:]
    assert "Traceback" not in stderr and "SIGTERM received" not in stderr, stderr[-3000:]


def test_ctrl_c_stops_cleanly_with_130(services):
    service, _ = services[1]
    code, stderr = service.stop(signal.SIGINT)
    assert code == 130 and stderr.splitlines()[-1] == "interrupted", stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
