"""The official NOVA code (baaivision/NOVA, `diffnext`) as a benchmark target, from a checkout the user supplies.

Nothing of it is vendored: `--official PATH` names a checkout (e.g. `git clone https://github.com/baaivision/NOVA`),
which is put on `sys.path` of the target's worker process only. It loads the same synthetic checkpoint as every
other target: the checkpoint's `__transformer__.py` / `__vae__.py` / `__text_encoder__.py` shims import the
official classes from `diffnext`. The official code needs `einops` and `scipy` beside this project's packages
(`pip install einops scipy`). It predates transformers 5, which moved PhiConfig's `rope_theta` and
`partial_rotary_factor` into `rope_parameters`; the official Phi encoder reads them as attributes, so they are
given back to PhiConfig as read-only properties over `rope_parameters` (where transformers lacks them).

The official registry knows the released architecture names only (`vit_d16w1024`, ...); the synthetic
checkpoints use names of the same form at other sizes (`vit_d2w64`), so they are registered here with the
official builder functions, at the head counts this runtime reads from the same names (runtime/model/config.py).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

PACKAGE = "diffnext"


def check_checkout(path: str | Path) -> Path:
    """`path` as a checkout of the official code; one sentence when it is not one."""
    path = Path(path)
    if not (path / PACKAGE / "pipelines" / "nova").is_dir():
        raise ValueError(f"--official {path} is not a checkout of baaivision/NOVA (no {PACKAGE}/pipelines/nova in it)")
    return path.resolve()


def load_pipeline(checkout: str | Path, checkpoint: Path, dtype, device: str) -> Any:
    """The official NOVAPipeline over `checkpoint`, in `dtype` on `device` (as its README loads it)."""
    sys.path.insert(0, str(check_checkout(checkout)))
    _rope_attributes()
    _register_architectures(checkpoint)
    from diffnext.pipelines import NOVAPipeline

    return NOVAPipeline.from_pretrained(str(checkpoint), torch_dtype=dtype, trust_remote_code=True).to(device)


def _rope_attributes() -> None:
    from transformers import PhiConfig

    def reader(name: str) -> property:
        def read(config):
            try:
                return config.__dict__["rope_parameters"][name]
            except (KeyError, TypeError):  # while PhiConfig itself is being built
                raise AttributeError(name) from None
        return property(read)

    for name in ("rope_theta", "partial_rotary_factor"):
        if not hasattr(PhiConfig(), name):
            setattr(PhiConfig, name, reader(name))


def _register_architectures(checkpoint: Path) -> None:
    from diffnext.models.transformers import transformer_nova as official

    from runtime.configs import transformer_config
    from runtime.model.config import num_heads_for, parse_arch

    video, image, mlp = transformer_config(checkpoint).arch
    for registry, builder, name, kind in ((official.VIDEO_ENCODERS, official.video_encoder, video, "vit"),
                                          (official.IMAGE_ENCODERS, official.image_encoder, image, "vit"),
                                          (official.IMAGE_DECODERS, official.image_decoder, mlp, "mlp")):
        if registry.has(name):
            continue
        depth, width = parse_arch(name, kind)
        heads = {"num_heads": num_heads_for(width)} if kind == "vit" else {}
        registry.register(name, builder, depth=depth, embed_dim=width, **heads)
