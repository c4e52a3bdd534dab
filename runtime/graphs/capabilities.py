"""What one build serves, and the refusal of a request it cannot serve, naming the build flag that would.

A `BuildProfile` fixes every static shape; together with the checkpoint's geometry and the graphs that were
built it decides which requests run. Each refusal says what the engines were built for and which flag of
`export/build_engines.py` builds engines that serve the request.
"""

from __future__ import annotations

import dataclasses
import functools

from runtime.graphs.profile import BuildProfile, Geometry, fewest_mask_steps
from runtime.request import Request

# served by builds with the third guidance pass (`BuildProfile.third_pass`)
THIRD_PASS_OPTIONS = ("image_guidance_scale", "spatiotemporal_guidance_scale")
# the export/build_engines.py flag of each profile field a refusal names
BUILD_FLAGS = {"prompts": "--prompts", "images_per_prompt": "--images-per-prompt", "cfg": "--no-cfg",
               "max_latent_length": "--latent-capacity", "min_mask_steps": "--min-mask-steps",
               "diffusion_steps": "--loop-diffusion-steps", "image_to_video": "--no-image-to-video",
               "third_pass": "--third-guidance-pass", "guidance_renorm": "--guidance-renorm"}


@dataclasses.dataclass(frozen=True)
class BuildCapabilities:
    """A build's profile and geometry, the graphs it has, and whether its VAE is the video VAE."""

    profile: BuildProfile
    geometry: Geometry
    graphs: frozenset[str]
    video_vae: bool

    def unrolls(self, num_diffusion_steps: int) -> bool:
        """Whether `denoise_loop` runs this step count in one launch (else denoise per step, then place)."""
        return "denoise_loop" in self.graphs and num_diffusion_steps == self.profile.diffusion_steps

    def whole_grid(self, num_diffusion_steps: int) -> bool:
        """Whether the mask step's diffusion loop runs over every token (a --guidance-renorm build's loop)."""
        return self.unrolls(num_diffusion_steps) and self.profile.guidance_renorm

    @functools.cached_property
    def min_mask_steps(self) -> int:
        """The fewest num_inference_steps whose schedule fits the built tokens per mask step."""
        return fewest_mask_steps(self.geometry.num_tokens, self.geometry.max_tokens_per_step)

    def describe(self) -> str:
        g, profile = self.geometry, self.profile
        loop = f", {profile.diffusion_steps} diffusion steps per launch" if "denoise_loop" in self.graphs else ""
        return (f"{g.batch} image(s) per call ({profile.prompts} prompt(s) x {profile.images_per_prompt}), "
                f"CFG {'on' if g.cfg else 'off'}, up to {g.max_latent_length} latent frame(s), "
                f"up to {g.max_tokens_per_step} tokens per mask step (num_inference_steps >= {self.min_mask_steps})"
                f"{loop}{', a third guidance pass (image/spatiotemporal guidance)' if g.blocks == 3 else ''}")

    def check(self, request: Request, schedule: list[int]) -> None:
        """Raise ValueError for a request these graphs cannot serve (`schedule`: its tokens per mask step)."""
        if request.latents is not None and len(request.latents) > 1 and not self.video_vae:
            raise ValueError(f"{len(request.latents)} latent frames given; an image VAE decodes one")
        refusal = self._refusal(request, schedule)
        if refusal is not None:
            problem, rebuild = refusal
            raise ValueError(f"{problem}; these engines were built for {self.describe()} (rebuild {rebuild})")

    def _refusal(self, request: Request, schedule: list[int]) -> tuple[str, str] | None:
        """-> (the problem, how to rebuild), or None when the build serves the request."""
        g, flags = self.geometry, BUILD_FLAGS
        rebuild_batch = (f"with {flags['prompts']} {request.num_prompts} {flags['images_per_prompt']} "
                         f"{request.num_images_per_prompt}")
        if request.batch > g.batch:
            return (f"{request.num_prompts} prompt(s) x {request.num_images_per_prompt} image(s) = {request.batch} "
                    f"images per call", rebuild_batch)
        if request.guided and not g.cfg:  # a CFG build serves unguided requests too: its graphs take the cond rows
            return (f"guidance_scale {request.guidance_scale:g} needs classifier-free guidance",
                    f"without {flags['cfg']}")
        third = [name for name in request.extra_options if name in THIRD_PASS_OPTIONS]
        if third and g.blocks < 3:
            return f"{third[0]} needs a third guidance pass", f"with {flags['third_pass']}"
        if "guidance_renorm" in request.extra_options and not self.whole_grid(request.num_diffusion_steps):
            return ("guidance_renorm runs in a diffusion loop over the whole token grid",
                    f"with {flags['guidance_renorm']}" if not self.profile.guidance_renorm else
                    f"with {flags['diffusion_steps']} {request.num_diffusion_steps} for this step count")
        if request.max_latent_length > g.max_latent_length:
            return (f"max_latent_length {request.max_latent_length} exceeds the KV cache",
                    f"with {flags['max_latent_length']} {request.max_latent_length}")
        if request.image is not None and "vae_encoder" not in self.graphs:
            return ("image-to-video needs the VAE encoder graph, which was not built",
                    f"without {flags['image_to_video']}" if not self.profile.image_to_video else
                    f"with {flags['max_latent_length']} 2 or more")
        if max(schedule) > g.max_tokens_per_step:
            return (f"num_inference_steps {request.num_inference_steps} predicts up to {max(schedule)} tokens in "
                    f"one step", f"with {flags['min_mask_steps']} {request.num_inference_steps} for fewer")
        if request.prompts is not None:
            rows = request.num_prompts * (2 if request.guided and request.negative_prompts else 1)
            if rows > g.text_batch:
                return f"{rows} prompts to encode in one call", rebuild_batch
        return None
