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


def _engine_folder(checkpoint, out, profile):
    """An fp32 ONNX Runtime engine folder, as export/build_engines.py writes it.

    The engine fixtures unroll the diffusion loop for 4 steps, the num_diffusion_steps the tests request:
    they run the one-launch-per-mask-step path a deployment runs at its built count, and the export of 4
    unrolled steps takes ~3 s against ~24 s for the default 25."""
    from export.build import BuildOptions, build

    build(BuildOptions(checkpoint=checkpoint, out=out, precision="fp32", profile=profile, progress=False),
          report=lambda message: None)
    return out


@pytest.fixture(scope="session")
def t2i_engines(tiny_t2i, tmp_path_factory):
    from runtime.graphs.profile import BuildProfile

    return _engine_folder(tiny_t2i, tmp_path_factory.mktemp("engines") / "t2i",
                          BuildProfile(min_mask_steps=8, diffusion_steps=4))


@pytest.fixture(scope="session")
def t2v_engines(tiny_t2v, tmp_path_factory):
    from runtime.graphs.profile import BuildProfile

    return _engine_folder(tiny_t2v, tmp_path_factory.mktemp("engines") / "t2v",
                          BuildProfile(min_mask_steps=4, max_latent_length=5, diffusion_steps=4))
