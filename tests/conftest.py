import pytest
import torch

from runtime.checkpoint import synthesize

# Tiny models are dominated by per-op overhead; one thread is faster and immune to OpenMP spinning
# when the two cores of a CI machine are shared.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_t2i(tmp_path_factory):
    return synthesize("tiny-t2i", tmp_path_factory.mktemp("ckpt") / "tiny-t2i", seed=0)


@pytest.fixture(scope="session")
def tiny_t2v(tmp_path_factory):
    return synthesize("tiny-t2v", tmp_path_factory.mktemp("ckpt") / "tiny-t2v", seed=0)


@pytest.fixture(scope="session")
def t2i_pipe(tiny_t2i):
    from runtime.reference import ReferencePipeline

    return ReferencePipeline.from_pretrained(tiny_t2i)


def _engine_folder(checkpoint, out, profile, precision="fp32"):
    """An ONNX Runtime engine folder (default exporter, validated), as export/build_engines.py writes it.
    Builds are the slowest fixtures of the suite: each is made once per session and shared."""
    from export.build import BuildOptions, build

    build(BuildOptions(checkpoint=checkpoint, out=out, precision=precision, profile=profile, progress=False),
          report=lambda message: None)
    return out


@pytest.fixture(scope="session")
def t2i_engines(tiny_t2i, tmp_path_factory):
    from runtime.graphs.profile import BuildProfile

    return _engine_folder(tiny_t2i, tmp_path_factory.mktemp("engines") / "t2i", BuildProfile(min_mask_steps=8))


@pytest.fixture(scope="session")
def t2v_engines(tiny_t2v, tmp_path_factory):
    from runtime.graphs.profile import BuildProfile

    return _engine_folder(tiny_t2v, tmp_path_factory.mktemp("engines") / "t2v",
                          BuildProfile(min_mask_steps=4, max_latent_length=5))


@pytest.fixture(scope="session")
def t2i_fp16_engines(tiny_t2i, tmp_path_factory):
    """The embedded default's build: fp16, default profile (what `make run` builds)."""
    from runtime.graphs.profile import BuildProfile

    return _engine_folder(tiny_t2i, tmp_path_factory.mktemp("engines") / "t2i-fp16", BuildProfile(), "fp16")
