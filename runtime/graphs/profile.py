"""Build profile (every static shape of a build) and the per-component precision policy.

A `BuildProfile` is what a user chooses when building engines: prompts per call, images per
prompt, classifier-free guidance on/off, the longest video (KV-cache capacity), the fewest mask
steps a request may use and the diffusion step count the diffusion loop is unrolled for. `Geometry`
combines it with a checkpoint's transformer config into the numbers every graph declaration needs
(batch sizes, token counts, cache length, ...).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from runtime.model.config import NOVAConfig
from runtime.options import OPTIONS
from runtime.schedules import mask_schedule

PRECISION_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # precision -> dtype name
PRECISIONS = tuple(PRECISION_DTYPES)
NO_CLIP = 3.0e38  # clip_range meaning "no clipping" (finite: some backends mishandle inf bounds)
VIDEO_VAE_WINDOW = 5  # latents per temporal tile of the Open-Sora VAE decoder

# Compute precision of every graph per build precision (ENGINEERING.md §5):
#  - Phi-2 attention overflows in fp16 -> the text encoder runs in fp32 in an fp16 build;
#  - the SDXL VAE decoder overflows in fp16 -> VAEs run in fp32 in an fp16 build;
#  - `place` has no matrix work and is exact in fp32.
# Inside fp16/bf16 graphs, LayerNorm/GroupNorm and the sampler/CFG arithmetic are fp32 islands.
POLICY: dict[str, dict[str, str]] = {
    "fp32": {},
    "fp16": {"text_encoder": "fp32", "vae_decoder": "fp32", "vae_encoder": "fp32", "place": "fp32"},
    "bf16": {"place": "fp32"},
}
# TensorRT runs bf16 natively: there Phi-2 takes bf16 instead of fp32 in an fp16 build (half the
# memory). ONNX Runtime's CPU provider has no bf16 kernels, so its builds keep fp32.
BACKEND_POLICY: dict[str, dict[str, dict[str, str]]] = {"tensorrt": {"fp16": {"text_encoder": "bf16"}}}
POLICY_REASONS = {
    ("fp16", "text_encoder"): "Phi-2 attention overflows in fp16",
    ("fp16", "vae_decoder"): "the SDXL/Open-Sora VAEs overflow in fp16",
    ("fp16", "vae_decoder_single"): "the SDXL/Open-Sora VAEs overflow in fp16",
    ("fp16", "vae_encoder"): "the SDXL/Open-Sora VAEs overflow in fp16",
    ("fp16", "place"): "no matrix work: exact in fp32",
    ("bf16", "place"): "no matrix work: exact in fp32",
}


def component_precision(component: str, precision: str, overrides: dict[str, str] | None = None,
                        backend: str = "onnxruntime") -> str:
    """The compute precision of one graph in a build of `precision` for `backend` (overrides win)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if overrides and component in overrides:
        if overrides[component] not in PRECISIONS:
            raise ValueError(f"precision of {component} must be one of {', '.join(PRECISIONS)}, "
                             f"got {overrides[component]!r}")
        return overrides[component]
    backend_policy = BACKEND_POLICY.get(backend, {}).get(precision, {})
    return backend_policy.get(component, POLICY[precision].get(component, precision))


KNOWN_TOKEN_BUCKETS = 8  # spatial-graph lengths per frame: +4 % encoder FLOPs over exact lengths (engines/README.md)


def known_bucket(num_tokens: int) -> int:
    return -(-num_tokens // KNOWN_TOKEN_BUCKETS)


def known_slots(num_tokens: int, known: int) -> int:
    """Known-token slots of the spatial graph for `known` generated tokens: the next multiple of the
    bucket (at least one bucket, at most N); slots beyond `known` are masked."""
    bucket = known_bucket(num_tokens)
    return min(num_tokens, max(1, -(-known // bucket)) * bucket)


def max_tokens_per_step(num_tokens: int, min_steps: int) -> int:
    """The most tokens one mask step predicts for any request with >= `min_steps` mask steps.

    The cosine schedule's largest step shrinks as the step count grows (checked for every K <= N
    at N = 16, 24, 1440 and 4096), and for K >= N no step exceeds 2 tokens; the runner still
    checks each request's schedule against the built n_max.
    """
    if min_steps < 1:
        raise ValueError(f"min_mask_steps must be >= 1, got {min_steps}")
    return min(num_tokens, max(2, max(mask_schedule(num_tokens, min_steps))))


def fewest_mask_steps(num_tokens: int, max_tokens_per_step: int) -> int:
    """The fewest mask steps whose schedule predicts at most `max_tokens_per_step` tokens in any step (more
    steps never predict more in one: see `max_tokens_per_step`)."""
    return next((k for k in range(1, num_tokens + 1) if max(mask_schedule(num_tokens, k)) <= max_tokens_per_step),
                num_tokens)


@dataclasses.dataclass(frozen=True)
class BuildProfile:
    """What one set of engines serves. Every static shape of every graph follows from it."""

    prompts: int = 1  # prompts per call (P)
    images_per_prompt: int = 1
    cfg: bool = True  # classifier-free guidance batch (guidance_scale > 1)
    max_latent_length: int | None = None  # latent frames (KV capacity); None: 1 for images, 9 for video
    # sets tokens per step: those of this step count's schedule (fewer steps may fit too: the build's true
    # minimum is `BuildCapabilities.min_mask_steps`); by default the default request's
    min_mask_steps: int = OPTIONS["num_inference_steps"].default
    max_tokens_per_step: int | None = None  # overrides the value derived from min_mask_steps
    image_to_video: bool = True  # video checkpoints: also build the VAE encoder
    # num_diffusion_steps in one launch per mask step (denoise_loop; others: one per step); by default the default's
    diffusion_steps: int = OPTIONS["num_diffusion_steps"].default
    third_pass: bool = False  # a third guidance block: image_guidance_scale and spatiotemporal_guidance_scale
    guidance_renorm: bool = False  # denoise_loop over the whole token grid: guidance_renorm's per-sample norms

    def __post_init__(self):
        for name in ("prompts", "images_per_prompt", "min_mask_steps", "diffusion_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("max_latent_length", "max_tokens_per_step"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.third_pass and not self.cfg:
            raise ValueError("the third guidance pass needs classifier-free guidance (cfg)")
        if self.guidance_renorm and not self.cfg:
            raise ValueError("guidance_renorm needs classifier-free guidance (cfg)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Every number the graphs need: checkpoint geometry x build profile."""

    batch: int  # B: images per call (prompts x images per prompt)
    model_batch: int  # M = blocks * B
    text_batch: int  # most prompts per text-encoder call (positives + negatives)
    cfg: bool
    blocks: int  # guidance row blocks: 1, 2 with CFG (cond, uncond), 3 with the third pass (runtime.guidance)
    num_tokens: int  # N image tokens
    num_video_tokens: int  # Nv
    width: int  # D
    text_dim: int  # Dt
    text_len: int  # 256
    condition_len: int  # Lc: 256 (+2 motion tokens on video checkpoints)
    channels: int  # C latent channels
    latent_size: tuple[int, int]  # h, w
    token_dim: int  # values per image token (16)
    patch: int
    video_depth: int
    num_heads: int
    head_dim: int
    max_latent_length: int  # T_max
    cache_length: int  # Lmax = Lc + T_max * Nv
    max_tokens_per_step: int  # n_max
    known_bucket: int  # the spatial graph's known-token slots come in multiples of this
    has_motion: bool
    has_mixer: bool
    base_t: int
    image_size: tuple[int, int]

    @classmethod
    def from_config(cls, config: NOVAConfig, profile: BuildProfile) -> "Geometry":
        frames = profile.max_latent_length or (9 if config.has_motion else 1)
        if frames > 1 and not config.has_motion:
            raise ValueError(f"this is an image checkpoint: max latent length must be 1, got {frames}")
        n_max = profile.max_tokens_per_step or max_tokens_per_step(config.num_image_tokens, profile.min_mask_steps)
        if n_max > config.num_image_tokens:
            raise ValueError(f"max tokens per step {n_max} exceeds the {config.num_image_tokens} image tokens")
        batch = profile.prompts * profile.images_per_prompt
        blocks = 3 if profile.third_pass else 2 if profile.cfg else 1
        # the third block's text rows repeat encoded ones (the negative or the prompt): nothing more to encode
        text_batch = profile.prompts * min(blocks, 2)
        return cls(
            batch=batch, model_batch=batch * blocks, text_batch=text_batch, cfg=profile.cfg, blocks=blocks,
            num_tokens=config.num_image_tokens, num_video_tokens=config.num_video_tokens, width=config.width,
            text_dim=config.text_token_dim, text_len=config.text_token_len,
            condition_len=config.num_condition_tokens, channels=config.image_dim, latent_size=config.latent_size,
            token_dim=config.token_dim, patch=config.patch_size, video_depth=config.video_depth,
            num_heads=config.num_heads, head_dim=config.width // config.num_heads, max_latent_length=frames,
            cache_length=config.num_condition_tokens + frames * config.num_video_tokens,
            max_tokens_per_step=n_max, known_bucket=known_bucket(config.num_image_tokens),
            has_motion=config.has_motion, has_mixer=bool(config.video_mixer_rank),
            base_t=config.video_base_size[0], image_size=tuple(config.image_size))

    @property
    def video(self) -> bool:
        return self.max_latent_length > 1

    def known_slots(self, known: int) -> int:
        return known_slots(self.num_tokens, known)

    @property
    def max_known_slots(self) -> int:
        """Slots for the most tokens known before a mask step (N - 1: every step predicts >= 1)."""
        return self.known_slots(self.num_tokens - 1)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def frame_position(index: int, num_frames: int, base_t: int) -> np.ndarray:
    """The `frame_position` input for latent frame `index` of a `num_frames` request: index * base_t /
    num_frames, computed as VideoPosEmbed does (float32 index divided by the float32 of
    num_frames / base_t). -> [1] float32."""
    return (np.float32(index) / np.float32(num_frames / base_t)).reshape(1).astype(np.float32)
