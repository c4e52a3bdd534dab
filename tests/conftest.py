"""Session fixtures shared by the whole suite: tiny synthetic checkpoints and the engine folders built from
them. Builds are the slowest part of the suite, so each folder is built once per run, also under
pytest-xdist (`make test` runs two workers): the first worker to need a folder builds it under the run's
shared temporary folder while holding a file lock, the others wait and reuse it."""

import os

import pytest
import torch
from filelock import FileLock

from runtime.checkpoint import synthesize

# Tiny models are dominated by per-op overhead; one thread is faster and immune to OpenMP spinning when the two
# cores of a CI machine are shared by two test workers (a worker left at two torch threads doubled the times of
# its later tests, measured). ONNX Runtime too (the backend reads NOVA_ORT_THREADS, and subprocesses inherit
# it): its default is a pool over every core that spins between ops.
torch.set_num_threads(1)
os.environ["NOVA_ORT_THREADS"] = "1"


def _shared(tmp_path_factory, name: str, make):
    """`make(folder)` once per test run for every xdist worker; -> the folder."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    folder, done = root / "shared" / name, root / "shared" / f"{name}.done"
    done.parent.mkdir(exist_ok=True)
    with FileLock(str(done) + ".lock"):
        if not done.exists():
            make(folder)
            done.touch()
    return folder


# `make test` hands pytest-xdist's workers whole files (--dist loadfile), so each module-scoped fixture starts
# once per run; the files that share the service's Ray instance (tests/service/conftest.py) are one unit, so it
# starts once too. Units go out longest first (--no-loadscope-reorder keeps this order), so that the two workers
# end together: LONGEST_FIRST go out first, in this order, the rest follow in file order. An order chosen by
# measurement on 2 cores, not by size alone: with it the workers ended 5 s apart (222 s); moving
# test_export.py (51 s, two dynamo builds) up beside the Ray instance's start made both slower (236 s).
RAY_CLUSTER = "ray-cluster"
RAY_CLUSTER_FILES = ("tests/service/test_api.py", "tests/service/test_web.py")
LONGEST_FIRST = (RAY_CLUSTER, "tests/test_benchmarks.py", "tests/test_official_options.py", "tests/test_build.py",
                 "tests/test_serve_cli.py")


def work_unit(nodeid: str) -> str:
    path = nodeid.split("::", 1)[0]
    return RAY_CLUSTER if path in RAY_CLUSTER_FILES else path


def pytest_collection_modifyitems(items):
    rank = {unit: i for i, unit in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(work_unit(item.nodeid), len(rank)))  # stable: file order within a unit


def pytest_xdist_make_scheduler(config, log):
    """--dist loadfile, with RAY_CLUSTER_FILES as one unit (xdist's own grouping, --dist loadgroup, does not
    group under pytest 9.2)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Units(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return Units(config, log)


@pytest.fixture(scope="session")
def tiny_t2i(tmp_path_factory):
    return _shared(tmp_path_factory, "tiny-t2i", lambda folder: synthesize("tiny-t2i", folder, seed=0))


@pytest.fixture(scope="session")
def tiny_t2v(tmp_path_factory):
    return _shared(tmp_path_factory, "tiny-t2v", lambda folder: synthesize("tiny-t2v", folder, seed=0))


@pytest.fixture(scope="session")
def t2i_pipe(tiny_t2i):
    from runtime.reference import ReferencePipeline

    return ReferencePipeline.from_pretrained(tiny_t2i)


# Exporters: the product's default, dynamo, is ~5x slower to export (a tiny video folder: 40 s against 9 s on 2 cores),
# so it builds two folders: t2v-third, which holds every kind of graph in its fullest form (three guidance row blocks;
# tests/test_export.py checks each graph), and t2i-fp16, the embedded default's build (`make run`). TorchScript
# (_engines' default) builds the others, where the tests are about the runtime, serving or guidance; its graphs
# declare the same static output shapes (CUDA-graph capture needs them).
DYNAMO = "dynamo"


def _engine_folder(checkpoint, out, profile, precision, exporter):
    """An ONNX Runtime engine folder (validated), as export/build_engines.py writes it."""
    from export.build import BuildOptions, build

    build(BuildOptions(checkpoint=checkpoint, out=out, precision=precision, profile=profile, exporter=exporter,
                       progress=False), report=lambda message: None)
    return out


def _engines(tmp_path_factory, checkpoint, name: str, precision: str = "fp32", exporter: str = "torchscript",
             **profile):
    """An fp32 folder whose diffusion loop is unrolled for 4 steps, the num_diffusion_steps the tests request:
    they run the one-launch-per-mask-step path a deployment runs at its built count, and the export of 4
    unrolled steps takes ~3 s against ~24 s for the default 25."""
    from runtime.graphs.profile import BuildProfile

    profile = {"diffusion_steps": 4, **profile}
    return _shared(tmp_path_factory, name,
                   lambda folder: _engine_folder(checkpoint, folder, BuildProfile(**profile), precision, exporter))


@pytest.fixture(scope="session")
def t2i_engines(tiny_t2i, tmp_path_factory):
    return _engines(tmp_path_factory, tiny_t2i, "t2i", min_mask_steps=8)


@pytest.fixture(scope="session")
def t2i_b4_engines(tiny_t2i, tmp_path_factory):
    """Four prompts per call: the text and VAE batches are dynamic dims; serving batches into it."""
    return _engines(tmp_path_factory, tiny_t2i, "t2i-b4", prompts=4, min_mask_steps=8)


@pytest.fixture(scope="session")
def t2v_engines(tiny_t2v, tmp_path_factory):
    """A 9-latent KV cache: a video of 9 latents decodes in two windows."""
    return _engines(tmp_path_factory, tiny_t2v, "t2v9", min_mask_steps=4, max_latent_length=9)


@pytest.fixture(scope="session")
def t2i_third_pass_engines(tiny_t2i, tmp_path_factory):
    """Every official option: three guidance row blocks (on an image checkpoint: no motion_flow, so raw_bos
    follows frame_position) and the whole-grid diffusion loop of guidance_renorm."""
    return _engines(tmp_path_factory, tiny_t2i, "t2i-third", third_pass=True, guidance_renorm=True, min_mask_steps=8)


@pytest.fixture(scope="session")
def t2v_third_pass_engines(tiny_t2v, tmp_path_factory):
    """Every official option: three guidance row blocks (image_guidance_scale and spatiotemporal_guidance_scale,
    and plain CFG) and the whole-grid diffusion loop of guidance_renorm."""
    return _engines(tmp_path_factory, tiny_t2v, "t2v-third", exporter=DYNAMO, third_pass=True, guidance_renorm=True,
                    min_mask_steps=4, max_latent_length=3)


@pytest.fixture(scope="session")
def t2i_fp16_engines(tiny_t2i, tmp_path_factory):
    """The embedded default's build (`make run`): fp16, the default profile but for the diffusion loop, unrolled
    for 4 steps like the other fixtures (its default 25 would add ~20 s of export; requests at 25 steps take
    the per-step graphs)."""
    return _engines(tmp_path_factory, tiny_t2i, "t2i-fp16", "fp16", DYNAMO)
