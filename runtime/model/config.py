"""NOVA transformer configuration: the fields of `transformer/config.json` and what follows from them."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

# Head counts of the released widths (official registry); any other width uses width // 16 heads.
RELEASED_HEADS = {768: 12, 1024: 16, 1536: 16}

_VIT_ARCH = re.compile(r"^vit_d(\d+)w(\d+)$")
_MLP_ARCH = re.compile(r"^mlp_d(\d+)w(\d+)$")


def parse_arch(name: str, kind: str) -> tuple[int, int]:
    """Return (depth, width) of an architecture name such as `vit_d16w1024` or `mlp_d3w1280`."""
    match = (_VIT_ARCH if kind == "vit" else _MLP_ARCH).match(name)
    if match is None:
        raise ValueError(f"arch entry {name!r} is not of the form {kind}_d<depth>w<width>")
    return int(match.group(1)), int(match.group(2))


def num_heads_for(width: int) -> int:
    heads = RELEASED_HEADS.get(width, width // 16)
    if heads < 1 or width % heads:
        raise ValueError(f"width {width} cannot be split into {heads} attention heads")
    return heads


@dataclasses.dataclass(frozen=True)
class NOVAConfig:
    """The official `NOVATransformer3DModel` config fields (keys starting with `_` are metadata)."""

    image_dim: int
    image_size: tuple[int, int]  # pixels (H, W)
    image_stride: int
    text_token_dim: int
    text_token_len: int
    image_base_size: tuple[int, int]
    video_base_size: tuple[int, int, int]
    arch: tuple[str, str, str]
    video_mixer_rank: int | None = None
    rotary_pos_embed: bool = False

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "NOVAConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        public = {k: v for k, v in raw.items() if not k.startswith("_")}
        unknown = sorted(set(public) - fields)
        if unknown:
            raise ValueError(f"transformer config has unknown fields: {', '.join(unknown)}")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.default is dataclasses.MISSING and f.name not in public)
        if missing:
            raise ValueError(f"transformer config lacks required fields: {', '.join(missing)}")
        size = public["image_size"]
        public["image_size"] = (size, size) if isinstance(size, int) else tuple(size)
        for key in ("image_base_size", "video_base_size", "arch"):
            public[key] = tuple(public[key])
        config = cls(**public)
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}
        if out["video_mixer_rank"] is None:
            del out["video_mixer_rank"]
        if not out["rotary_pos_embed"]:
            del out["rotary_pos_embed"]
        return out

    def validate(self) -> None:
        if self.rotary_pos_embed:
            raise ValueError("rotary_pos_embed=true is not supported: no released NOVA checkpoint uses it")
        parse_arch(self.arch[0], "vit"), parse_arch(self.arch[1], "vit"), parse_arch(self.arch[2], "mlp")
        if self.video_width != self.image_width:
            raise ValueError("video and image encoder widths must be equal (one token space)")
        h, w = self.latent_size
        if h % self.video_patch or w % self.video_patch:
            raise ValueError(f"latent size {h}x{w} is not divisible by the video patch {self.video_patch}")
        if (h // self.patch_size, w // self.patch_size) != tuple(self.image_base_size):
            raise ValueError(f"image_base_size {list(self.image_base_size)} does not match the "
                             f"{h // self.patch_size}x{w // self.patch_size} token grid of image_size")
        if (h // self.video_patch, w // self.video_patch) != tuple(self.video_base_size[1:]):
            raise ValueError(f"video_base_size {list(self.video_base_size)} does not match the "
                             f"{h // self.video_patch}x{w // self.video_patch} video token grid")

    # Derived geometry (official: patch = 15 // stride + 1, video patch twice that).
    @property
    def latent_size(self) -> tuple[int, int]:
        return self.image_size[0] // self.image_stride, self.image_size[1] // self.image_stride

    @property
    def patch_size(self) -> int:
        return 15 // self.image_stride + 1

    @property
    def video_patch(self) -> int:
        return 2 * self.patch_size

    @property
    def token_dim(self) -> int:
        """Latent values per image token (p * p * channels)."""
        return self.patch_size**2 * self.image_dim

    @property
    def num_image_tokens(self) -> int:
        return self.image_base_size[0] * self.image_base_size[1]

    @property
    def num_video_tokens(self) -> int:
        return self.video_base_size[1] * self.video_base_size[2]

    @property
    def video_depth(self) -> int:
        return parse_arch(self.arch[0], "vit")[0]

    @property
    def video_width(self) -> int:
        return parse_arch(self.arch[0], "vit")[1]

    @property
    def image_depth(self) -> int:
        return parse_arch(self.arch[1], "vit")[0]

    @property
    def image_width(self) -> int:
        return parse_arch(self.arch[1], "vit")[1]

    @property
    def width(self) -> int:
        return self.image_width

    @property
    def num_heads(self) -> int:
        return num_heads_for(self.width)

    @property
    def mlp_depth(self) -> int:
        return parse_arch(self.arch[2], "mlp")[0]

    @property
    def mlp_width(self) -> int:
        return parse_arch(self.arch[2], "mlp")[1]

    @property
    def has_motion(self) -> bool:
        """Video checkpoints (base time length > 1) carry motion (flow, fps) tokens."""
        return self.video_base_size[0] > 1

    @property
    def num_condition_tokens(self) -> int:
        return self.text_token_len + (2 if self.has_motion else 0)
