"""Official NOVA checkpoint folders: strict loading, and synthetic random-weight checkpoints.

A folder looks like the published ones (diffusers layout):

    model_index.json
    scheduler/scheduler_config.json
    text_encoder/{__text_encoder__.py, config.json, model-0000{1,2}-of-00002.safetensors, model.safetensors.index.json}
    tokenizer/{tokenizer.json, tokenizer_config.json}
    transformer/{__transformer__.py, config.json, diffusion_pytorch_model.safetensors}
    vae/{__vae__.py, config.json, diffusion_pytorch_model.safetensors}

Every weight file is checked key by key against the module built from the folder's config: a
missing, unexpected or mis-shaped tensor is one `CheckpointError` naming them all.

    python -m runtime synth --variant tiny-t2i --out DIR [--seed N]

The command lines take a synthetic variant by name (`resolve_checkpoint`): written to
`checkpoints/synthetic/VARIANT` on first use, reused after.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from runtime.configs import CheckpointError, read_json, transformer_config
from runtime.model.config import NOVAConfig
from runtime.model.transformer import NOVATransformer3DModel
from runtime.variants import SYNTHETIC_ROOT, VARIANT_NAMES


WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
TEXT_ENCODER_SHARDS = 2  # the published Phi-2 weights come in two shards


# ---------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------
def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of one component: a sharded index, or the single file."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        shards = sorted(set(read_json(indexes[0]).get("weight_map", {}).values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if not shards or missing:
            raise CheckpointError(f"{indexes[0]} names missing shards: {', '.join(missing) or '(none listed)'}")
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no .safetensors weights in {folder}")
    if len(files) > 1:
        raise CheckpointError(f"several .safetensors files and no index in {folder}: {', '.join(f.name for f in files)}")
    return files


def _read(path: Path, read: Callable[[Any], Any]) -> Any:
    """Run `read` on an open safetensors file; unreadable files become a CheckpointError."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return read(handle)
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise CheckpointError(f"cannot read {path}: {error}") from None


def read_shapes(folder: Path) -> dict[str, torch.Size]:
    """Key -> shape of every tensor of a component, without reading the data."""
    shapes: dict[str, torch.Size] = {}
    for path in weight_files(folder):
        shapes.update(_read(path, lambda f: {k: torch.Size(f.get_slice(k).get_shape()) for k in f.keys()}))
    return shapes


def read_state_dict(folder: Path, keep: Callable[[str], bool] = lambda key: True) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        state.update(_read(path, lambda f: {k: f.get_tensor(k) for k in f.keys() if keep(k)}))
    return state


def check_keys(expected: dict[str, torch.Size], found: dict[str, torch.Size], where: Path) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(f"{k} {list(found[k])} (expected {list(expected[k])})"
                       for k in set(expected) & set(found) if found[k] != expected[k])
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(f"weights in {where} do not match its config; " + "; ".join(problems))


def load_weights(module: nn.Module, folder: Path, dtype: torch.dtype, device: torch.device | str,
                 expected: dict[str, torch.Size] | None = None, prefix: str = "") -> nn.Module:
    """Strictly load `folder`'s weights into a module built on the meta device.

    `expected` is the full key set of the file (defaults to the module's own state dict); only keys
    starting with `prefix` are loaded, with the prefix removed.
    """
    expected = expected or {k: v.shape for k, v in module.state_dict().items()}
    check_keys(expected, read_shapes(folder), folder)
    state = read_state_dict(folder, keep=lambda key: key.startswith(prefix))
    state = {k[len(prefix):]: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
             for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=True)
    return module


def _transformer_on_meta(folder: Path) -> tuple[nn.Module, dict[str, torch.Size]]:
    with torch.device("meta"):
        model = NOVATransformer3DModel(transformer_config(folder))
    return model, {k: v.shape for k, v in model.state_dict().items()}


def _text_encoder_on_meta(folder: Path) -> tuple[nn.Module, dict[str, torch.Size]]:
    """Phi-2 body; the file also holds the unused `lm_head` (checked, not read)."""
    from runtime.model.text_encoder import build_text_encoder, phi_config_from_dict  # transformers: ~4 s to import

    config = phi_config_from_dict(read_json(folder / "text_encoder" / "config.json"))
    with torch.device("meta"):
        encoder = build_text_encoder(config)
    expected = {f"model.{k}": v.shape for k, v in encoder.state_dict().items()}
    expected["lm_head.weight"] = torch.Size([config.vocab_size, config.hidden_size])
    expected["lm_head.bias"] = torch.Size([config.vocab_size])
    return encoder, expected


def _vae_on_meta(folder: Path) -> tuple[nn.Module, dict[str, torch.Size]]:
    from runtime.model.vae import vae_class

    raw = read_json(folder / "vae" / "config.json")
    cls = vae_class(raw.get("_class_name"), folder / "vae")
    with torch.device("meta"):
        vae = cls.from_config(raw)
    return vae, {k: v.shape for k, v in vae.state_dict().items()}


_COMPONENTS = {"transformer": _transformer_on_meta, "text_encoder": _text_encoder_on_meta, "vae": _vae_on_meta}


def check_weights(folder: str | os.PathLike) -> None:
    """Every component's weight files against its config, from the file headers only (seconds even for
    full-size checkpoints): a CheckpointError naming the problems, before anything is exported or loaded."""
    folder = Path(folder)
    for component, on_meta in _COMPONENTS.items():
        check_keys(on_meta(folder)[1], read_shapes(folder / component), folder / component)


def load_transformer(folder: str | os.PathLike, dtype: torch.dtype = torch.float32,
                     device: torch.device | str = "cpu") -> NOVATransformer3DModel:
    model, _ = _transformer_on_meta(Path(folder))
    load_weights(model, Path(folder) / "transformer", dtype, device)
    return model.to(device).eval()


def load_text_encoder(folder: str | os.PathLike, dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu"):
    encoder, expected = _text_encoder_on_meta(Path(folder))
    load_weights(encoder, Path(folder) / "text_encoder", dtype, device, expected, prefix="model.")
    encoder.rotary_emb = type(encoder.rotary_emb)(encoder.config).to(device)  # its inv_freq is not in the file
    return encoder.eval()


def load_vae(folder: str | os.PathLike, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    vae, _ = _vae_on_meta(Path(folder))
    return load_weights(vae, Path(folder) / "vae", dtype, device).eval()


# ---------------------------------------------------------------------------------------------------
# Synthetic checkpoints
# ---------------------------------------------------------------------------------------------------
PHI2_CONFIG = {
    "architectures": ["PhiEncoderModel"], "model_type": "phi", "vocab_size": 51200, "hidden_size": 2560,
    "intermediate_size": 10240, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
    "partial_rotary_factor": 0.4, "rope_theta": 10000.0, "layer_norm_eps": 1e-5, "hidden_act": "gelu_pytorch_tanh",
    "max_position_embeddings": 2048, "bos_token_id": 50256, "eos_token_id": 50256, "pad_token_id": 50256,
    "qk_layernorm": False, "tie_word_embeddings": False, "torch_dtype": "float16",
}
TINY_PHI_CONFIG = {**PHI2_CONFIG, "hidden_size": 80, "intermediate_size": 320, "num_hidden_layers": 2,
                   "num_attention_heads": 2, "num_key_value_heads": 2}

SDXL_VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "act_fn": "silu", "norm_num_groups": 32,
    "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True,
}
TINY_SDXL_VAE_CONFIG = {**SDXL_VAE_CONFIG, "block_out_channels": [32, 32, 64, 64], "layers_per_block": 1,
                        "sample_size": 64}

FLOW_MATCH_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}
# The released DDPM config was not retrievable (NOVA_SPEC §8); these are diffusers' defaults, written out.
DDPM_SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
                  "beta_start": 0.0001, "beta_end": 0.02, "clip_sample": True, "clip_sample_range": 1.0,
                  "prediction_type": "epsilon", "variance_type": "fixed_small", "timestep_spacing": "leading"}


def t2i_transformer_config(width: int, image_size: int, depths=(16, 32, 6), text_dim: int = 2560) -> dict[str, Any]:
    """A text-to-image transformer config of the released family at another width / size / depth."""
    grid = image_size // 8
    return {"image_dim": 4, "image_size": image_size, "image_stride": 8, "text_token_dim": text_dim,
            "text_token_len": 256, "image_base_size": [grid // 2, grid // 2], "video_base_size": [1, grid // 4, grid // 4],
            "arch": [f"vit_d{depths[0]}w{width}", f"vit_d{depths[1]}w{width}", f"mlp_d{depths[2]}w{width}"]}


def _t2v_transformer(width: int, mlp: tuple[int, int], size: tuple[int, int], depths=(16, 32), text_dim: int = 2560,
                     rank: int = 24) -> dict[str, Any]:
    h, w = size[0] // 8, size[1] // 8
    return {"image_dim": 4, "image_size": list(size), "image_stride": 8, "text_token_dim": text_dim,
            "text_token_len": 256, "image_base_size": [h // 2, w // 2], "video_base_size": [16, h // 4, w // 4],
            "video_mixer_rank": rank,
            "arch": [f"vit_d{depths[0]}w{width}", f"vit_d{depths[1]}w{width}", f"mlp_d{mlp[0]}w{mlp[1]}"]}


def _variants() -> dict[str, dict[str, Any]]:
    from runtime.model.vae_opensora import OSP480_VAE_CONFIG, TINY_VAE_CONFIG

    t2i = {"scheduler": FLOW_MATCH_SCHEDULER, "text_encoder": PHI2_CONFIG, "vae": SDXL_VAE_CONFIG}
    t2v = {"scheduler": DDPM_SCHEDULER, "text_encoder": PHI2_CONFIG, "vae": OSP480_VAE_CONFIG}
    return {
        "tiny-t2i": {**t2i, "text_encoder": TINY_PHI_CONFIG, "vae": TINY_SDXL_VAE_CONFIG,
                     "transformer": t2i_transformer_config(64, 64, depths=(2, 4, 2), text_dim=80)},
        "tiny-t2v": {**t2v, "text_encoder": TINY_PHI_CONFIG, "vae": TINY_VAE_CONFIG,
                     "transformer": _t2v_transformer(64, (2, 80), (64, 96), depths=(2, 4), text_dim=80, rank=8)},
        "d48w768-sdxl1024": {**t2i, "transformer": t2i_transformer_config(768, 1024)},
        "d48w1024-sdxl1024": {**t2i, "transformer": t2i_transformer_config(1024, 1024)},
        "d48w1536-sdxl1024": {**t2i, "transformer": t2i_transformer_config(1536, 1024)},
        "d48w1024-osp480": {**t2v, "transformer": _t2v_transformer(1024, (3, 1280), (480, 768))},
    }


def random_state_dict(shapes: dict[str, torch.Size], generator: torch.Generator,
                      dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Seeded weights that keep activations in range: norms 1, biases 0, weights N(0, 1/fan_in)."""
    state = {}
    for key, shape in shapes.items():
        if len(shape) == 1:
            value = torch.ones(shape) if key.endswith("weight") and "norm" in key else torch.zeros(shape)
        else:
            fan_in = max(1, shape[1:].numel())
            value = torch.randn(shape, generator=generator) / fan_in**0.5
        state[key] = value.to(dtype)
    return state


# The official submodule defining each class a shim re-exports (NOVA_SPEC.md §2). Not the packages
# above them: `diffnext.models.autoencoders` exports nothing, so `from diffnext.models.autoencoders
# import AutoencoderKL` fails.
SHIM_MODULES = {
    "NOVATransformer3DModel": "diffnext.models.transformers.transformer_nova",
    "PhiEncoderModel": "diffnext.models.text_encoders.phi",
    "AutoencoderKL": "diffnext.models.autoencoders.autoencoder_kl",
    "AutoencoderKLOpenSora": "diffnext.models.autoencoders.autoencoder_kl_opensora",
}


def _write_shim(folder: Path, component: str, class_name: str) -> None:
    # The official pipeline resolves `__xxx__` entries of model_index.json through these files.
    module = SHIM_MODULES[class_name]
    (folder / f"__{component}__.py").write_text(
        f'"""Points diffusers at the official NOVA class (written by nova-runtime)."""\n\n'
        f"from {module} import {class_name}  # noqa: F401\n")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def synthesize(variant: str | dict[str, Any], out: str | os.PathLike, seed: int = 0) -> Path:
    """Write a random-weight checkpoint of `variant` to `out`, file for file like the official ones.

    variant: a name of VARIANT_NAMES, or the configs themselves ({"scheduler", "text_encoder", "vae",
    "transformer"}, e.g. with `t2i_transformer_config`) for other sizes (the benchmarks' mid-size model).
    Written to a temporary sibling folder and renamed at the end, so an interrupted run leaves no
    half-written checkpoint behind.
    """
    variants = _variants()
    if isinstance(variant, str) and variant not in variants:
        raise ValueError(f"unknown variant {variant!r}; choose one of: {', '.join(VARIANT_NAMES)}")
    spec, target = variants[variant] if isinstance(variant, str) else variant, Path(out)
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} exists and is not empty")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _synthesize_into(spec, staging, torch.Generator().manual_seed(seed))
        for path in [staging, *staging.rglob("*")]:  # mkdtemp and safetensors create private modes
            path.chmod(0o755 if path.is_dir() else 0o644)
        if target.exists():
            target.rmdir()
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _synthesize_into(spec: dict[str, Any], root: Path, generator: torch.Generator) -> None:
    from runtime.model.text_encoder import build_text_encoder, phi_config_from_dict, write_synthetic_tokenizer
    from runtime.model.vae import vae_class

    vae_config = spec["vae"]
    _write_json(root / "model_index.json", {
        "_class_name": "NOVAPipeline", "_diffusers_version": "0.31.0",
        "scheduler": ["diffusers", spec["scheduler"]["_class_name"]],
        "text_encoder": ["__text_encoder__", "PhiEncoderModel"],
        "tokenizer": ["transformers", "CodeGenTokenizerFast"],
        "transformer": ["__transformer__", "NOVATransformer3DModel"],
        "vae": ["__vae__", vae_config["_class_name"]],
    })
    _write_json(root / "scheduler" / "scheduler_config.json", spec["scheduler"])
    write_synthetic_tokenizer(root / "tokenizer")

    # transformer: 16-bit storage, like the published files
    _write_json(root / "transformer" / "config.json", {"_diffusers_version": "0.31.0", **spec["transformer"]})
    _write_shim(root / "transformer", "transformer", "NOVATransformer3DModel")
    with torch.device("meta"):
        transformer = NOVATransformer3DModel(NOVAConfig.from_dict(spec["transformer"]))
    shapes = {k: v.shape for k, v in transformer.state_dict().items()}
    save_file(random_state_dict(shapes, generator, torch.float16), str(root / "transformer" / WEIGHTS_NAME))

    # text encoder: Phi-2 in two shards plus index, fp16
    text_dir = root / "text_encoder"
    _write_json(text_dir / "config.json", spec["text_encoder"])
    _write_shim(text_dir, "text_encoder", "PhiEncoderModel")
    with torch.device("meta"):
        phi = build_text_encoder(phi_config_from_dict(spec["text_encoder"]))
    shapes = {f"model.{k}": v.shape for k, v in phi.state_dict().items()}
    hidden, vocab = spec["text_encoder"]["hidden_size"], spec["text_encoder"]["vocab_size"]
    shapes.update({"lm_head.weight": torch.Size([vocab, hidden]), "lm_head.bias": torch.Size([vocab])})
    _save_sharded(random_state_dict(shapes, generator, torch.float16), text_dir, TEXT_ENCODER_SHARDS)

    # VAE: fp32, like the published SDXL-type file
    _write_json(root / "vae" / "config.json", vae_config)
    _write_shim(root / "vae", "vae", vae_config["_class_name"])
    with torch.device("meta"):
        vae = vae_class(vae_config["_class_name"], root / "vae").from_config(vae_config)
    shapes = {k: v.shape for k, v in vae.state_dict().items()}
    save_file(random_state_dict(shapes, generator, torch.float32), str(root / "vae" / WEIGHTS_NAME))


def _save_sharded(state: dict[str, torch.Tensor], folder: Path, num_shards: int) -> None:
    keys = list(state)
    per_shard = -(-len(keys) // num_shards)
    weight_map, total = {}, 0
    for i in range(num_shards):
        name = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        shard = {k: state[k].contiguous() for k in keys[i * per_shard:(i + 1) * per_shard]}
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        total += sum(v.numel() * v.element_size() for v in shard.values())
    _write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def resolve_checkpoint(checkpoint: str | os.PathLike | None, variant: str | None, *,
                       specs: dict[str, dict[str, Any]] | None = None,
                       root: str | os.PathLike = SYNTHETIC_ROOT) -> Path:
    """A checkpoint folder: `checkpoint` itself, else the synthetic `variant` at `root/variant`, written on
    first use and reused after.

    specs: configs of further variants by name, as `synthesize` takes them (the benchmarks' mid-size model).
    """
    if checkpoint:
        return Path(checkpoint)
    specs = specs or {}
    if variant not in VARIANT_NAMES and variant not in specs:
        raise ValueError(f"unknown variant {variant!r}; choose one of: {', '.join([*VARIANT_NAMES, *specs])}")
    folder = Path(root) / variant
    if not (folder / "model_index.json").is_file():  # synthesize() renames a finished folder into place
        print(f"writing synthetic {variant} checkpoint to {folder} (first use)", file=sys.stderr, flush=True)
        synthesize(specs.get(variant, variant), folder)
    return folder
