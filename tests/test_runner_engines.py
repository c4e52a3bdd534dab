"""NOVARunner over engine folders built by export/build_engines.py (ONNX Runtime on CPU)."""

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch

from export import manifest as mf
from export.build import BuildOptions, build
from runtime.graphs.profile import BuildProfile
from runtime.reference import ReferencePipeline
from runtime.runner import NOVARunner
from tests.test_runner import assert_parity


def test_onnxruntime_text_to_image_matches_reference(t2i_engines, t2i_pipe):
    runner = NOVARunner.from_engines(t2i_engines)  # auto: no TensorRT here -> ONNX Runtime
    assert runner.backend.name == "onnxruntime"
    options = dict(num_inference_steps=8, num_diffusion_steps=4, negative_prompt="blurry")
    ours = runner("a lighthouse at dusk", seed=0, **options)
    theirs = t2i_pipe("a lighthouse at dusk", generator=torch.Generator().manual_seed(0), disable_progress_bar=True,
                      **options)
    assert_parity(ours, theirs)


def test_onnxruntime_video_and_image_to_video(t2v_engines, tiny_t2v):
    runner = NOVARunner.from_engines(t2v_engines, backend="onnxruntime")
    pipe = ReferencePipeline.from_pretrained(tiny_t2v)
    image = (np.random.default_rng(1).random((64, 96, 3)) * 255).astype(np.uint8)
    options = dict(num_inference_steps=4, num_diffusion_steps=3, max_latent_length=5)
    for extra in ({}, {"image": image}):
        ours = runner("a river", seed=0, **options, **extra)
        theirs = pipe("a river", generator=torch.Generator().manual_seed(0), disable_progress_bar=True,
                      output_type="latent", **options, **extra)
        assert ours.frames.shape == (1, 17, 64, 96, 3)
        error = np.abs(ours.latents - theirs.latents.numpy()).max(axis=(0, 1, 3, 4))
        assert error[0] < 1e-3, error  # later frames: see test_runner.py on the model's rounding amplification


def test_torch_backend_from_an_engine_folder_equals_from_checkpoint(t2i_engines, tiny_t2i):
    # the folder's profile (its loop unrolls 4 steps): the same graphs, so the same numbers; a loop of 25 would
    # differ from 25 single steps by the rounding of the batched timestep embedding (tests/test_denoise_loop.py)
    profile = BuildProfile(min_mask_steps=8, diffusion_steps=4)
    a = NOVARunner.from_engines(t2i_engines, backend="torch")("a cat", seed=1, num_inference_steps=8)
    b = NOVARunner.from_checkpoint(tiny_t2i, profile)("a cat", seed=1, num_inference_steps=8)
    assert np.array_equal(a.latents, b.latents)


def test_output_buffers_alternate_and_are_allocated_once():
    from runtime.backends.base import OutputBuffers

    made = []
    buffers = OutputBuffers(lambda shape, dtype: made.append((shape, dtype)) or np.zeros(shape, dtype))
    shapes = {"x_next": ((1, 4, 16), np.float32)}
    a, b, c = (buffers.next("denoise", shapes) for _ in range(3))
    assert a["x_next"] is not b["x_next"] and c["x_next"] is a["x_next"]  # ping-pong: never the one just written
    assert buffers.next("place", shapes)["x_next"] is not a["x_next"]  # per graph
    assert buffers.next("denoise", {"x_next": ((2, 4, 16), np.float32)})["x_next"].shape == (2, 4, 16)  # per shape
    assert len(made) == 6


def test_onnxruntime_outputs_are_preallocated_and_reused(t2i_engines):
    runner = NOVARunner.from_engines(t2i_engines, backend="onnxruntime")
    options = dict(seed=0, num_inference_steps=8, num_diffusion_steps=3)
    first = runner("a cat", **options)
    buffers = {key: [id(value) for pair in sets for value in pair.values()]
               for key, sets in runner.backend.buffers.sets.items()}
    assert {key[0] for key in buffers} == {"temporal_prefill", "spatial", "denoise", "place", "vae_decoder"}
    second = runner("a cat", **options)
    assert {key: [id(value) for pair in sets for value in pair.values()]
            for key, sets in runner.backend.buffers.sets.items()} == buffers  # the same buffers, none added
    assert np.array_equal(first.latents, second.latents) and np.array_equal(first.images, second.images)


@pytest.fixture
def engine_copy(t2i_engines, tmp_path):
    return shutil.copytree(t2i_engines, tmp_path / "copy")


def test_missing_partial_edited_and_mismatched_folders_are_refused(engine_copy, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no manifest.json, so it is not an engine folder"):
        NOVARunner.from_engines(tmp_path / "empty")
    data = engine_copy / "spatial.onnx.data"
    original = data.read_bytes()
    data.write_bytes(original[:-4] + b"\0\0\0\0")
    with pytest.raises(ValueError, match="graph spatial: spatial.onnx.data was modified after the build"):
        NOVARunner.from_engines(engine_copy)
    data.write_bytes(original)
    assert NOVARunner.from_engines(engine_copy).backend.name == "onnxruntime"
    (engine_copy / "denoise.onnx").unlink()
    with pytest.raises(ValueError, match="denoise.onnx is missing"):
        NOVARunner.from_engines(engine_copy)
    manifest = engine_copy / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"precision": "fp32"', '"precision": "fp16"', 1))
    with pytest.raises(ValueError, match="edited after the build"):
        NOVARunner.from_engines(engine_copy)
    body = json.loads(manifest.read_text())
    mf.save_manifest(engine_copy, body)
    body["format"] = mf.FORMAT - 1  # a folder built by another version: the one version check
    manifest.write_text(json.dumps(body))
    with pytest.raises(ValueError, match=f"another version of this runtime \\(format {mf.FORMAT - 1}, this version "
                                         f"reads format {mf.FORMAT}\\); rebuild with export/build_engines.py"):
        NOVARunner.from_engines(engine_copy)


def test_partial_build_is_refused(tiny_t2i, tmp_path):
    out = tmp_path / "partial"
    build(BuildOptions(checkpoint=tiny_t2i, out=out, precision="fp32", only=("place",), progress=False,
                       profile=BuildProfile(min_mask_steps=8)), report=lambda message: None)
    with pytest.raises(ValueError, match=r"partial build \(no text_encoder, temporal_prefill"):
        NOVARunner.from_engines(out)


def test_folder_is_self_contained_without_its_checkpoint(engine_copy, tmp_path):
    body = json.loads((engine_copy / "manifest.json").read_text())
    body["checkpoint"]["path"] = str(tmp_path / "moved")
    mf.save_manifest(engine_copy, {k: v for k, v in body.items() if k not in ("checksum", "format")})
    out = NOVARunner.from_engines(engine_copy)("a cat", seed=0, num_inference_steps=8, num_diffusion_steps=2)
    assert out.images.shape == (1, 64, 64, 3)  # configs, scheduler and tokenizer came from configs/
    with pytest.raises(ValueError, match="torch backend reads weights from the checkpoint .*moved, which is not there"):
        NOVARunner.from_engines(engine_copy, backend="torch")
    (engine_copy / "configs" / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="configs/tokenizer/tokenizer.json is missing"):
        NOVARunner.from_engines(engine_copy)


_WITHOUT = """
import sys
for name in sys.argv[2].split(","):
    sys.modules[name] = None  # `import name` now raises ImportError
from runtime.runner import NOVARunner
{body}
print(sorted(m for m in ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "tensorrt") if sys.modules.get(m)))
"""


def _run_without(modules: str, folder, body: str) -> str:
    import subprocess
    import sys
    from pathlib import Path

    result = subprocess.run([sys.executable, "-c", _WITHOUT.format(body=body), str(folder), modules],
                            cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_onnxruntime_runner_needs_no_torch(t2i_engines, t2i_pipe):
    body = """
import numpy as np
runner = NOVARunner.from_engines(sys.argv[1], backend="onnxruntime")
a, b = (runner("a lighthouse", seed=3, num_inference_steps=8, num_diffusion_steps=4) for _ in range(2))
c = runner("a lighthouse", seed=4, num_inference_steps=8, num_diffusion_steps=4)
assert a.images.shape == (1, 64, 64, 3) and a.images.dtype == np.uint8
assert np.array_equal(a.latents, b.latents) and not np.array_equal(a.latents, c.latents)  # numpy draws, seeded
"""
    assert _run_without("torch,diffusers,transformers", t2i_engines, body) == "['onnxruntime']"


def test_tensorrt_path_imports_neither_torch_nor_onnxruntime(t2i_engines):
    body = """
try:
    NOVARunner.from_engines(sys.argv[1], backend="tensorrt", device="cuda")
    raise SystemExit("an ONNX-only folder was accepted for TensorRT")
except ValueError as error:  # the runner's imports and the manifest check ran before this refusal
    assert "has no TensorRT engine; rebuild with --backend tensorrt" in str(error), error
"""
    assert _run_without("torch,diffusers,transformers,onnxruntime", t2i_engines, body) == "[]"


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_tensorrt_backend_without_tensorrt_is_one_clear_sentence(t2i_engines):
    with pytest.raises(ValueError, match="has no TensorRT engine; rebuild with --backend tensorrt"):
        NOVARunner.from_engines(t2i_engines, backend="tensorrt")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None,
                    reason="TensorRT is not installable on these machines (see ENGINEERING.md); needs a GPU machine with it")
def test_tensorrt_runner_matches_reference(tiny_t2i, tmp_path, t2i_pipe):
    out = tmp_path / "trt"
    build(BuildOptions(checkpoint=tiny_t2i, out=out, precision="fp32", backend="tensorrt", progress=False,
                       profile=BuildProfile(min_mask_steps=8, diffusion_steps=4)), report=lambda message: None)
    runner = NOVARunner.from_engines(out, backend="tensorrt", device="cuda")
    ours = runner("a cat", seed=0, num_inference_steps=8, num_diffusion_steps=4)
    theirs = t2i_pipe("a cat", generator=torch.Generator().manual_seed(0), disable_progress_bar=True,
                      num_inference_steps=8, num_diffusion_steps=4)
    assert_parity(ours, theirs)


def test_generate_command_writes_image_and_video(t2i_engines, t2v_engines, tmp_path, capsys):
    from runtime.__main__ import main
    from runtime.media import read_mp4

    assert main(["generate", "--engines", str(t2i_engines), "--prompt", "a fox", "--steps", "8",
                 "--out", str(tmp_path / "fox.png")]) == 0
    assert main(["generate", "--engines", str(t2v_engines), "--prompt", "waves", "--steps", "4",
                 "--diffusion-steps", "2", "--latent-length", "5", "--out", str(tmp_path / "waves.mp4")]) == 0
    assert read_mp4(tmp_path / "waves.mp4").shape == (17, 64, 96, 3)
    assert "onnxruntime backend" in capsys.readouterr().out
    assert main(["generate", "--engines", str(t2i_engines), "--prompt", "a fox", "--latent-length", "3",
                 "--out", str(tmp_path / "x.mp4")]) == 2
    assert "image checkpoint" in capsys.readouterr().err


def test_unusable_devices_are_refused_in_one_sentence(t2i_engines, tiny_t2i):
    for device in ("tpu", "CPU", "", "cuda:x", 0):
        with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:N', got"):
            NOVARunner.from_engines(t2i_engines, device=device)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="the torch backend cannot use cuda: this torch build sees no CUDA GPU"):
            NOVARunner.from_checkpoint(tiny_t2i, BuildProfile(min_mask_steps=8), device="cuda")
    with pytest.raises(ValueError, match="engine folder .*nowhere does not exist"):
        NOVARunner.from_engines(t2i_engines / "nowhere")
