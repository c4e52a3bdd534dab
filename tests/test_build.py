"""The build's cache: reuse, partial rebuilds, mismatch detection, atomicity; the command line; TensorRT.

Builds here use the TorchScript exporter where the exporter does not matter (the cache logic is the
same for both; it is ~10x faster on tiny graphs), so the suite stays fast.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from export import build_engines
from export import manifest as mf
from export import tensorrt_build
from export.build import BuildError, BuildOptions, Builder, format_table
from export.validate import ValidationError
from runtime.configs import CheckpointConfigs
from runtime.engine_folder import EngineFolder
from runtime.graphs import BuildProfile, build_specs
from tests import NO_TORCH, simulated_gpu

ROOT = Path(__file__).resolve().parents[1]
GRAPHS = ("spatial", "denoise", "place", "vae_decoder")
TRT_OK, TRT_DETAIL = tensorrt_build.available()


def _build(checkpoint, out, only=GRAPHS, profile=None, **kwargs):
    options = BuildOptions(checkpoint=Path(checkpoint), out=Path(out), precision=kwargs.pop("precision", "fp32"),
                           backend=kwargs.pop("backend", "onnxruntime"),
                           profile=profile or BuildProfile(min_mask_steps=4), exporter=kwargs.pop("exporter", "torchscript"),
                           only=only, progress=False, **kwargs)
    messages = []
    rows = Builder(options, report=messages.append).run()
    return {r.component: r for r in rows}, messages


@pytest.fixture(scope="module")
def built(tiny_t2i, tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "base"
    rows, _ = _build(tiny_t2i, out)
    assert all(r.status == "rebuilt" for r in rows.values())
    return out


@pytest.fixture
def copy(built, tmp_path):
    """A private copy of the base build (tests edit it)."""
    target = tmp_path / "engines"
    shutil.copytree(built, target)
    return target


def _verified(folder, engines=False):
    """The manifest, every artifact it records checked: what `EngineFolder.open` checks, for the partial builds
    (`only=GRAPHS`) of these tests."""
    manifest = mf.load_manifest(folder)
    if manifest is None:
        raise mf.ManifestError(f"{folder} has no manifest.json")
    records = {"configs": manifest["configs"] or []}
    records.update({name: e["artifacts"] + (e["engine"]["artifacts"] if engines else [])
                    for name, e in manifest["components"].items()})
    for name, files in records.items():
        if problem := mf.check_artifacts(files, folder):
            raise mf.ManifestError(f"graph {name}: {problem}")
    return manifest


def _mtimes(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file()}


def test_second_run_rebuilds_nothing(copy, tiny_t2i):
    before = _mtimes(copy)
    rows, _ = _build(tiny_t2i, copy)
    assert {r.status for r in rows.values()} == {"reused"}
    assert all(r.why == "content key unchanged, artifacts verified" for r in rows.values())
    assert _mtimes(copy) == before
    table = format_table(list(rows.values()))
    assert "reused" in table and "spatial.onnx" in table


def test_profile_change_rebuilds_only_the_graphs_it_shapes(copy, tiny_t2i):
    rows, _ = _build(tiny_t2i, copy, profile=BuildProfile(min_mask_steps=2))  # more tokens per step
    assert {n for n, r in rows.items() if r.status == "rebuilt"} == {"spatial", "denoise", "place"}
    assert rows["vae_decoder"].status == "reused"
    assert "graph declaration (shapes/profile) changed" in rows["spatial"].why


def test_configs_are_copied_and_follow_the_checkpoint(copy, tiny_t2i, tmp_path):
    manifest = _verified(copy)
    files = {r["file"] for r in manifest["configs"]}
    assert {"configs/model_index.json", "configs/transformer/config.json", "configs/scheduler/scheduler_config.json",
            "configs/tokenizer/tokenizer.json"} <= files
    assert not any(f.endswith(".safetensors") for f in files)
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_t2i, checkpoint)
    config = checkpoint / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace("{", '{"_edited": 1, ', 1))
    rows, _ = _build(checkpoint, copy)
    assert {n for n, r in rows.items() if r.status == "rebuilt"} == {"configs"}
    assert "_edited" in (copy / "configs" / "scheduler" / "scheduler_config.json").read_text()
    (copy / "configs" / "tokenizer" / "tokenizer.json").write_text("{}")
    with pytest.raises(mf.ManifestError, match="tokenizer.json was modified after the build"):
        _verified(copy)


def test_precision_change_rebuilds_only_that_graph(copy, tiny_t2i):
    rows, _ = _build(tiny_t2i, copy, overrides={"vae_decoder": "fp16"})
    assert {n for n, r in rows.items() if r.status == "rebuilt"} == {"vae_decoder"}
    assert rows["vae_decoder"].why == "precision changed"


def test_weight_change_rebuilds_only_the_graphs_using_those_weights(copy, tiny_t2i, tmp_path):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_t2i, checkpoint)
    rows, _ = _build(checkpoint, copy)  # same weights elsewhere: the key does not depend on the path
    assert {r.status for r in rows.values()} == {"reused"}
    weights = checkpoint / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state["image_decoder.head.bias"] = state["image_decoder.head.bias"] + 1
    save_file(state, str(weights))
    rows, _ = _build(checkpoint, copy)
    assert {n for n, r in rows.items() if r.status == "rebuilt"} == {"denoise"}
    assert rows["denoise"].why == "checkpoint weights changed"


def test_code_change_is_detected(copy, tiny_t2i, monkeypatch):
    from export import build as build_module

    original = build_module.mf.source_digest
    changed = "runtime/graphs/denoise.py"
    monkeypatch.setattr(build_module.mf, "source_digest",
                        lambda root, paths: original(root, paths) + ("x" if changed in paths else ""))
    rows, _ = _build(tiny_t2i, copy)
    assert {n for n, r in rows.items() if r.status == "rebuilt"} == {"denoise", "place"}  # declared in denoise.py
    assert rows["denoise"].why == "export code changed"


def test_new_tolerances_revalidate_without_reexporting(copy, tiny_t2i, monkeypatch):
    from export import build as build_module

    looser = dataclasses.replace(build_module.TOLERANCES["fp32"], rtol=2e-4)
    monkeypatch.setitem(build_module.TOLERANCES, "fp32", looser)
    onnx_files = {k: v for k, v in _mtimes(copy).items() if ".onnx" in k}
    rows, _ = _build(tiny_t2i, copy)
    assert {r.status for n, r in rows.items() if n != "configs"} == {"revalidated"}
    assert {k: v for k, v in _mtimes(copy).items() if ".onnx" in k} == onnx_files
    entry = mf.load_manifest(copy)["components"]["spatial"]
    assert entry["validation"]["tolerance"]["rtol"] == 2e-4
    rows, _ = _build(tiny_t2i, copy)
    assert {r.status for r in rows.values()} == {"reused"}


def test_a_build_without_validation_is_validated_later_without_reexporting(tiny_t2i, tmp_path):
    out = tmp_path / "engines"
    rows, _ = _build(tiny_t2i, out, only=("place",), validate=False)
    assert rows["place"].parity == "not validated"
    rows, _ = _build(tiny_t2i, out, only=("place",))
    assert rows["place"].status == "revalidated" and rows["place"].parity.startswith("max 0.0e+00")


def test_edited_artifact_is_detected_refused_by_verify_and_rebuilt(copy, tiny_t2i):
    data = copy / "spatial.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(mf.ManifestError, match=r"graph spatial: spatial.onnx.data was modified after the build"):
        _verified(copy)
    rows, _ = _build(tiny_t2i, copy)
    assert {n for n, r in rows.items() if r.status == "rebuilt"} == {"spatial"}
    assert "spatial.onnx.data was modified after the build" in rows["spatial"].why
    _verified(copy)  # consistent again


def test_missing_artifact_is_rebuilt(copy, tiny_t2i):
    (copy / "place.onnx").unlink()
    with pytest.raises(mf.ManifestError, match="place.onnx is missing"):
        _verified(copy)
    rows, _ = _build(tiny_t2i, copy)
    assert rows["place"].status == "rebuilt" and rows["place"].why == "place.onnx is missing"


def test_corrupt_or_edited_manifest_gives_a_clear_error_and_a_rebuild(tiny_t2i, tmp_path):
    out = tmp_path / "engines"
    _build(tiny_t2i, out, only=("place",))
    manifest = json.loads((out / mf.MANIFEST_NAME).read_text())
    manifest["components"]["place"]["precision"] = "fp16"
    (out / mf.MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(mf.ManifestError, match="was edited after the build"):
        mf.load_manifest(out)
    rows, messages = _build(tiny_t2i, out, only=("place",))
    assert any("ignoring it and rebuilding every component" in m for m in messages)
    assert rows["place"].status == "rebuilt" and rows["place"].why == "manifest was corrupt"
    manifest = json.loads((out / mf.MANIFEST_NAME).read_text())
    mf.atomic_write_text(out / mf.MANIFEST_NAME, json.dumps({**manifest, "format": mf.FORMAT - 1}))
    rows, messages = _build(tiny_t2i, out, only=("place",))  # a folder of another version: rebuilt, saying so
    assert any(f"another version of this runtime (format {mf.FORMAT - 1}" in m for m in messages)
    assert rows["place"].status == "rebuilt" and rows["place"].why == "manifest of another version"
    assert rows["configs"].why == "manifest of another version"
    (out / mf.MANIFEST_NAME).write_text("{ not json")
    with pytest.raises(mf.ManifestError, match="is not valid JSON"):
        _verified(out)
    with pytest.raises(mf.ManifestError, match="has no manifest.json"):
        _verified(tmp_path)


def test_failed_validation_stops_the_build_and_installs_nothing(tiny_t2i, tmp_path, monkeypatch):
    from export import build as build_module

    def fail(spec, *args, **kwargs):
        raise ValidationError(f"graph {spec.name!r} (fp32) disagrees with its torch module in ONNX Runtime: x: ...")

    monkeypatch.setattr(build_module, "compare_cases", fail)
    out = tmp_path / "engines"
    with pytest.raises(BuildError, match="disagrees with its torch module.*nothing was installed for place"):
        _build(tiny_t2i, out, only=("place",))
    assert sorted(p.name for p in out.iterdir()) == []  # no artifact, no manifest, no staging folder


def test_interrupted_rebuild_leaves_the_old_entry_out_of_the_manifest(copy, tiny_t2i, monkeypatch):
    """A crash while an artifact is being replaced: the manifest no longer vouches for it, so the next run
    rebuilds it instead of trusting half-replaced files."""
    from export import build as build_module

    real_replace = os.replace

    def crash(src, dst):
        if str(dst).endswith("denoise.onnx.data"):
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(build_module.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        _build(tiny_t2i, copy, force=True, only=("denoise",))
    monkeypatch.undo()
    assert "denoise" not in mf.load_manifest(copy)["components"]
    assert not any(p.name.startswith(".staging") for p in copy.iterdir())
    rows, _ = _build(tiny_t2i, copy)
    assert rows["denoise"].status == "rebuilt" and rows["denoise"].why == "not built yet"
    assert {r.status for n, r in rows.items() if n != "denoise"} == {"reused"}


def test_graphs_no_longer_in_the_build_are_removed(copy, tiny_t2i):
    rows, _ = _build(tiny_t2i, copy, only=None, profile=BuildProfile(min_mask_steps=4), validate=False)
    assert "text_encoder" in rows and "temporal_prefill" in rows
    # a stale entry (as after a profile change from video to image) disappears with its files
    manifest = mf.load_manifest(copy)
    manifest["components"]["temporal_step"] = {**manifest["components"]["place"], "artifacts": []}
    mf.save_manifest(copy, manifest)
    rows, _ = _build(tiny_t2i, copy, only=None, validate=False)
    assert rows["temporal_step"].status == "removed"
    assert "temporal_step" not in mf.load_manifest(copy)["components"]


def test_bf16_graphs_that_onnx_runtime_cpu_cannot_run_are_recorded_not_silently_switched(tiny_t2i, tmp_path):
    rows, messages = _build(tiny_t2i, tmp_path / "bf16", precision="bf16", only=("denoise", "place"))
    assert rows["denoise"].precision == "bf16" and rows["denoise"].parity.startswith("not run")
    assert any(m.startswith("denoise (bf16): not validated: ONNX Runtime") and "kernel" in m for m in messages)
    entry = mf.load_manifest(tmp_path / "bf16")["components"]["denoise"]
    assert entry["precision"] == "bf16" and entry["validation"]["passed"] is None
    assert rows["place"].parity.startswith("max 0.0e+00")  # fp32 by policy: validated


# -------------------------------------------------------------------------------------------------
# Command line
# -------------------------------------------------------------------------------------------------
def _cli(*args, cwd=ROOT, pythonpath=""):
    return subprocess.run([sys.executable, "export/build_engines.py", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": pythonpath})


def test_cli_help_reads_well():
    result = _cli("--help")
    assert result.returncode == 0
    for option in ("--checkpoint", "--synthetic", "--precision", "--backend", "--out", "--prompts",
                   "--images-per-prompt", "--no-cfg", "--max-latent-length", "--min-mask-steps"):
        assert option in result.stdout


@pytest.mark.skipif(TRT_OK, reason="TensorRT is importable here")
def test_cli_backend_tensorrt_without_tensorrt_is_one_sentence_and_nonzero(tiny_t2i, tmp_path):
    """Refused before torch is imported (seconds): `import torch` raises in this process."""
    (tmp_path / "sitecustomize.py").write_text(NO_TORCH)
    result = _cli("--checkpoint", str(tiny_t2i), "--backend", "tensorrt", "--out", str(tmp_path / "x"),
                  pythonpath=str(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: TensorRT is not available on this machine")


@pytest.mark.skipif(TRT_OK, reason="TensorRT is importable here")
def test_cli_auto_backend_builds_onnx_runtime_artifacts_and_says_why(tiny_t2i, tmp_path, capsys):
    """In this process (each subprocess would spend ~7 s importing the build; the tests above and the Ctrl-C test
    of tests/test_cli.py run the script itself)."""
    out = tmp_path / "engines"
    args = ["--checkpoint", str(tiny_t2i), "--out", str(out), "--only", "place", "--precision", "fp32",
            "--exporter", "torchscript", "--no-progress"]
    assert build_engines.main(args) == 0
    stdout = capsys.readouterr().out
    assert "TensorRT is not available on this machine" in stdout
    assert "place.onnx" in stdout and "rebuilt" in stdout
    assert (out / "manifest.json").exists() and (out / "place.onnx").exists()
    assert build_engines.main(args) == 0 and "0 rebuilt, 2 reused" in capsys.readouterr().out  # place, configs/


# -------------------------------------------------------------------------------------------------
# TensorRT
# -------------------------------------------------------------------------------------------------
def test_engine_profile_covers_every_dynamic_dim(tiny_t2i):
    specs = build_specs(CheckpointConfigs.read(tiny_t2i), BuildProfile(prompts=3), "fp16", backend="tensorrt")
    flags = tensorrt_build.engine_flags(specs["text_encoder"], "fp16", 8.0, 3)
    assert flags["profile"] == {"input_ids": [[1, 256], [6, 256], [6, 256]]}
    assert flags["strongly_typed"] and flags["tf32"]
    assert tensorrt_build.engine_flags(specs["denoise"], "fp32", 8.0, 3) == {
        "strongly_typed": True, "tf32": False, "workspace_gib": 8.0, "optimization_level": 3, "profile": {}}
    # known-token slots: one bucket (N / 8 = 2) .. N = 16, opt the middle bucket
    assert tensorrt_build.engine_flags(specs["spatial"], "fp16", 8.0, 3)["profile"] == {
        "known_ids": [[3, 2], [3, 8], [3, 16]]}
    assert specs["text_encoder"].precision == "bf16"  # Phi-2 on TensorRT in an fp16 build
    assert "install TensorRT" in tensorrt_build.unavailable_sentence("x")


@pytest.mark.skipif(not TRT_OK, reason=f"TensorRT is not installable on these machines ({TRT_DETAIL})")
def test_tensorrt_engines_build_validate_and_are_reused(tiny_t2i, tmp_path):
    out = tmp_path / "trt"
    rows, _ = _build(tiny_t2i, out, backend="tensorrt", exporter="dynamo", precision="fp16")
    assert all((out / f"{name}.plan").exists() for name in rows if name != "configs")
    manifest = EngineFolder.open(out, engines=True).manifest
    assert all(manifest["components"][n]["engine"]["validation"]["passed"] for n in rows)
    assert (out / tensorrt_build.TIMING_CACHE_NAME).exists()
    rows, _ = _build(tiny_t2i, out, backend="tensorrt", exporter="dynamo", precision="fp16")
    assert {r.status for r in rows.values()} == {"reused"}


def test_tensorrt_build_plumbing_on_a_simulated_gpu(tiny_t2i, tmp_path, monkeypatch):
    gpu = simulated_gpu.install(monkeypatch)  # records the builder calls; a plan names its ONNX graph
    out = tmp_path / "trt"
    profile = BuildProfile(prompts=2, min_mask_steps=4)
    rows, messages = _build(tiny_t2i, out, backend="auto", only=("text_encoder", "place"), profile=profile,
                            validate=False)
    assert (out / "place.plan").read_text() == str((out / "place.onnx").resolve()) and (out / "text_encoder.plan").exists()
    assert (out / tensorrt_build.TIMING_CACHE_NAME).read_bytes() == b"++"  # loaded, then saved after each build
    (out / tensorrt_build.TIMING_CACHE_NAME).write_bytes(b"corrupt")
    _, messages = _build(tiny_t2i, out, backend="tensorrt", only=("place",), profile=profile, validate=False,
                         force=True)
    assert any("does not fit this GPU and TensorRT version: starting a new one" in m for m in messages)
    assert (out / tensorrt_build.TIMING_CACHE_NAME).read_bytes() == b"+"  # replaced by a fresh cache
    calls = gpu.build_calls
    assert ("create_network", 1 << 5) in calls  # STRONGLY_TYPED
    assert ("parse_from_file", "text_encoder.onnx", True) in calls  # path form: external data beside it
    assert ("set_shape", "input_ids", (1, 256), (4, 256), (4, 256)) in calls
    assert ("workspace", 8 << 30) in calls and ("clear_flag", "tf32") in calls  # fp32 build: no TF32
    assert any("Building (2 steps)" in m for m in messages)
    manifest = _verified(out, engines=True)
    engine = manifest["components"]["place"]["engine"]
    assert engine["parts"]["tensorrt"] == "10.99.0-simulated" and engine["parts"]["gpu"] == "9.0"
    # same version and GPU: reused; another GPU: rebuilt, with the reason
    rows, _ = _build(tiny_t2i, out, backend="tensorrt", only=("place",), profile=profile, validate=False)
    assert rows["place"].status == "reused"
    gpu.capability = (8, 9)
    rows, _ = _build(tiny_t2i, out, backend="tensorrt", only=("place",), profile=profile, validate=False)
    assert rows["place"].status == "rebuilt" and "GPU compute capability changed (9.0 -> 8.9)" in rows["place"].why
    monkeypatch.setattr(sys.modules["tensorrt"], "__version__", "10.100.0-simulated")
    rows, _ = _build(tiny_t2i, out, backend="tensorrt", only=("place",), profile=profile, validate=False)
    assert rows["place"].status == "rebuilt" and "TensorRT version changed" in rows["place"].why


def test_checkpoint_and_out_problems_are_refused_before_anything_is_written(tiny_t2i, tmp_path):
    import struct

    def refused(checkpoint, message, out=None):
        out = out or tmp_path / "out"
        with pytest.raises(BuildError, match=message):
            _build(checkpoint, out, only=("place",))
        assert not (tmp_path / "out").exists()  # nothing created, nothing half-written

    def broken(name, edit):
        folder = shutil.copytree(tiny_t2i, tmp_path / name)
        edit(folder)
        return folder

    refused(broken("no-tokenizer", lambda f: (f / "tokenizer" / "tokenizer.json").unlink()),
            "has no tokenizer.json")
    refused(broken("stub-weights", lambda f: (f / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(
        struct.pack("<I", 7))), "cannot read .*vae/diffusion_pytorch_model.safetensors")

    def rename_key(folder):
        path = folder / "transformer" / "diffusion_pytorch_model.safetensors"
        state = load_file(path)
        key = sorted(state)[0]
        state[key + "_renamed"] = state.pop(key)
        save_file(state, path)
    refused(broken("renamed-key", rename_key), "weights in .*transformer do not match its config; missing: .*"
                                               "unexpected: .*_renamed")
    refused(tiny_t2i, "is inside the checkpoint folder", out=tiny_t2i / "engines")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    refused(tiny_t2i, "already holds files and no manifest.json", out=tmp_path / "busy")
