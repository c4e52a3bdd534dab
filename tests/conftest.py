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
