"""One local Ray instance for the HTTP tests of the service (test_api.py, test_web.py), started once per test run:
a Ray instance and its replicas take 20-40 s to start on the 2 shared cores of CI. `make test` keeps the tests
that use it on one worker (tests/conftest.py groups them), so the package's fixture starts it once."""

from __future__ import annotations

import pytest

from tests.service.apps import MAX_JOBS, TIGHT, VIDEO_DEADLINE_S, free_port


@pytest.fixture(scope="package")
def cluster(t2i_b4_engines, t2v_engines):
    """{"nova": base URL, "tight": its URL, "metrics": Ray's Prometheus URL} on a local Ray instance (no
    dashboard), 127.0.0.1 only, serving the batch-4 tiny-t2i folder and the 9-latent tiny-t2v one twice: "nova"
    at / (at most MAX_JOBS video jobs) and "tight" at /tight (a small image queue and a short video deadline)."""
    ray = pytest.importorskip("ray", reason="ray[serve] is not installed (pip install -e '.[serve]')")
    from ray import serve

    from serve.app import build_app

    port, metrics_port = free_port(), free_port()
    folders = [str(t2i_b4_engines), str(t2v_engines)]
    # 2 CPUs of logical resources for 4 replicas: the replicas ask for half a CPU each
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # 0.2 s of batch wait: on 2 shared cores (and beside another test worker) concurrent requests arrive
        # spread out; batches still fill
        common = dict(num_cpus=0.5, env={"NOVA_ORT_THREADS": "1"}, batch_wait_s=0.2)
        serve.run(build_app(folders, max_jobs=MAX_JOBS, job_keep_s=600, **common), name="nova", route_prefix="/")
        serve.run(build_app(folders, **TIGHT, **common, deadlines_s={"image": 120.0, "video": VIDEO_DEADLINE_S}),
                  name="tight", route_prefix="/tight")
        yield {"nova": f"http://127.0.0.1:{port}", "tight": f"http://127.0.0.1:{port}/tight",
               "metrics": f"http://127.0.0.1:{metrics_port}/metrics"}
    finally:
        ray.shutdown()  # ends the replicas with the instance (serve.shutdown's graceful drain first took 5 s more)


@pytest.fixture(scope="package")
def server(cluster) -> str:
    return cluster["nova"]
