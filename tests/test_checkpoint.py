"""Checkpoint folders: synthetic layout, strict loading, clear errors, nothing half-written."""

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime import checkpoint
from runtime.checkpoint import CheckpointError, load_text_encoder, load_transformer, load_vae, synthesize
from runtime.configs import model_index
from runtime.variants import VARIANT_NAMES

OFFICIAL_FILES = {
    "model_index.json", "scheduler/scheduler_config.json",
    "text_encoder/__text_encoder__.py", "text_encoder/config.json", "text_encoder/model.safetensors.index.json",
    "text_encoder/model-00001-of-00002.safetensors", "text_encoder/model-00002-of-00002.safetensors",
    "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
    "transformer/__transformer__.py", "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
    "vae/__vae__.py", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
}


def test_synthetic_folder_has_the_official_layout(tiny_t2i):
    files = {str(p.relative_to(tiny_t2i)) for p in tiny_t2i.rglob("*") if p.is_file()}
    assert files == OFFICIAL_FILES
    index = json.loads((tiny_t2i / "model_index.json").read_text())
    assert index["transformer"] == ["__transformer__", "NOVATransformer3DModel"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["tokenizer"] == ["transformers", "CodeGenTokenizerFast"]
    # 16-bit transformer storage, as published
    assert {t.dtype for t in load_file(tiny_t2i / "transformer" / checkpoint.WEIGHTS_NAME).values()} == {torch.float16}


def test_round_trip_loads_exactly_the_stored_weights(tiny_t2i):
    stored = load_file(tiny_t2i / "transformer" / checkpoint.WEIGHTS_NAME)
    model = load_transformer(tiny_t2i, dtype=torch.float32)
    for key, value in model.state_dict().items():
        assert torch.equal(value, stored[key].float()), key
    phi = load_text_encoder(tiny_t2i)
    shard = load_file(tiny_t2i / "text_encoder" / "model-00001-of-00002.safetensors")
    key = next(k for k in shard if k.startswith("model."))
    assert torch.equal(phi.state_dict()[key[len("model."):]], shard[key].float())
    assert load_vae(tiny_t2i).config.scaling_factor == 0.13025


def test_seed_changes_weights_and_same_seed_repeats(tmp_path):
    a = synthesize("tiny-t2i", tmp_path / "a", seed=1)
    b = synthesize("tiny-t2i", tmp_path / "b", seed=1)
    c = synthesize("tiny-t2i", tmp_path / "c", seed=2)
    name = "transformer/" + checkpoint.WEIGHTS_NAME
    wa, wb, wc = (load_file(p / name)["mask_embed.mask_token"] for p in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


@pytest.fixture
def broken(tiny_t2i, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_t2i, copy)
    return copy


def _edit_transformer(folder, edit):
    path = folder / "transformer" / checkpoint.WEIGHTS_NAME
    state = load_file(path)
    edit(state)
    save_file(state, path)


def test_missing_unexpected_and_misshaped_weights_are_named(broken):
    def edit(state):
        del state["mask_embed.bos_token"]
        state["mask_embed.extra_token"] = torch.zeros(1, 64)
        state["text_embed.proj.bias"] = torch.zeros(65)
    _edit_transformer(broken, edit)
    with pytest.raises(CheckpointError) as info:
        load_transformer(broken)
    message = str(info.value)
    assert "missing: mask_embed.bos_token" in message
    assert "unexpected: mask_embed.extra_token" in message
    assert "text_embed.proj.bias [65] (expected [64])" in message


def test_bf16_storage_loads(broken):
    _edit_transformer(broken, lambda s: s.update({k: v.to(torch.bfloat16) for k, v in s.items()}))
    assert load_transformer(broken, dtype=torch.float32).mask_embed.bos_token.dtype == torch.float32


def test_corrupt_and_missing_files_give_clear_errors(broken):
    (broken / "vae" / checkpoint.WEIGHTS_NAME).write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_vae(broken)
    (broken / "text_encoder" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="names missing shards: model-00002-of-00002"):
        load_text_encoder(broken)
    (broken / "transformer" / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_transformer(broken)


def test_folder_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        model_index(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="missing file .*model_index.json"):
        model_index(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"transformer": ["x", "y"]}))
    with pytest.raises(CheckpointError, match="no 'text_encoder', 'tokenizer', 'vae', 'scheduler' entry"):
        model_index(tmp_path)


def test_synthesize_refuses_unknown_variant_and_non_empty_target(tmp_path):
    with pytest.raises(ValueError, match="unknown variant 'tiny'.*tiny-t2i"):
        synthesize("tiny", tmp_path / "x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        synthesize("tiny-t2i", tmp_path / "full")


def test_interrupted_synthesis_leaves_nothing(tmp_path, monkeypatch):
    def fail(spec, root, generator):
        (root / "model_index.json").write_text("{}")
        raise RuntimeError("disk full")
    monkeypatch.setattr(checkpoint, "_synthesize_into", fail)
    with pytest.raises(RuntimeError):
        synthesize("tiny-t2i", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    from runtime.__main__ import main

    assert main(["synth", "--variant", "tiny-t2i", "--out", str(tmp_path / "a")]) == 0
    assert main(["synth", "--variant", "tiny-t2i", "--out", str(tmp_path / "a")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["synth", "--variant", "huge", "--out", str(tmp_path / "b")])


# The official module layout, from NOVA_SPEC.md §2 ("Shims must import from the official submodules",
# checked there against baaivision/NOVA HEAD 2cd254a): the submodule that defines each class.
OFFICIAL_CLASS_MODULES = {
    "NOVATransformer3DModel": "diffnext.models.transformers.transformer_nova",
    "PhiEncoderModel": "diffnext.models.text_encoders.phi",
    "AutoencoderKL": "diffnext.models.autoencoders.autoencoder_kl",
    "AutoencoderKLOpenSora": "diffnext.models.autoencoders.autoencoder_kl_opensora",
}
VIDEO_VARIANTS = {"tiny-t2v", "d48w1024-osp480"}


def _imports(path):
    return [(node.module, alias.name) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ImportFrom) for alias in node.names]


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_every_variants_shims_import_from_the_official_submodules(variant, tmp_path, monkeypatch):
    # Layout and shims only: the full-size variants' random weights would take minutes and gigabytes.
    monkeypatch.setattr(checkpoint, "random_state_dict", lambda shapes, generator, dtype: {})
    monkeypatch.setattr(checkpoint, "save_file", lambda state, path, metadata=None: open(path, "wb").close())
    folder = synthesize(variant, tmp_path / variant)
    index = json.loads((folder / "model_index.json").read_text())
    vae = "AutoencoderKLOpenSora" if variant in VIDEO_VARIANTS else "AutoencoderKL"
    expected = {"transformer": "NOVATransformer3DModel", "text_encoder": "PhiEncoderModel", "vae": vae}
    for component, class_name in expected.items():
        assert index[component] == [f"__{component}__", class_name]
        shim = folder / component / f"__{component}__.py"
        assert _imports(shim) == [(OFFICIAL_CLASS_MODULES[class_name], class_name)], shim.read_text()


def test_variant_names_are_the_synthesizable_variants():
    assert tuple(checkpoint._variants()) == VARIANT_NAMES


def test_resolve_checkpoint_writes_a_variant_once(tmp_path, monkeypatch, capsys):
    written = []

    def synthesize(variant, out):
        written.append((variant, out))
        out.mkdir(parents=True)
        (out / "model_index.json").write_text("{}")
    monkeypatch.setattr(checkpoint, "synthesize", synthesize)
    assert checkpoint.resolve_checkpoint("/models/x", None) == Path("/models/x")
    assert checkpoint.resolve_checkpoint(None, "tiny-t2i", root=tmp_path) == tmp_path / "tiny-t2i"
    assert checkpoint.resolve_checkpoint(None, "tiny-t2i", root=tmp_path) == tmp_path / "tiny-t2i"
    assert "writing synthetic tiny-t2i checkpoint" in capsys.readouterr().err
    spec = {"transformer": {}}
    checkpoint.resolve_checkpoint(None, "mid", specs={"mid": spec}, root=tmp_path)
    assert written == [("tiny-t2i", tmp_path / "tiny-t2i"), (spec, tmp_path / "mid")]
    with pytest.raises(ValueError, match="unknown variant 'huge'; choose one of: tiny-t2i, .*, mid"):
        checkpoint.resolve_checkpoint(None, "huge", specs={"mid": spec}, root=tmp_path)
