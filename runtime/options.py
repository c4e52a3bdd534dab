"""The generation options, declared once: name, type, default, range, help, and the build flag that
serves each on the compiled runner. `validate_request` (defaults and ranges), the command line's flags
(`python -m runtime generate|reference`), the HTTP request models (`serve/schema.py`) and the README's
"Generation options" table (checked by tests/test_options.py) are made from or checked against this.

Every size a request can choose is capped well above any official use (the official defaults are 64
mask steps, 25 diffusion steps, one image, 9 latent frames for a video), so an absurd request is refused
at once instead of running for hours. Needs nothing beyond the standard library: the command lines' --help and the core import it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

# -- caps on the sizes a request chooses ------------------------------------------------------------------
MAX_MASK_STEPS = 1 << 20  # the schedule is computed over every step: a bound keeps absurd requests cheap to refuse
MAX_DIFFUSION_STEPS = 1000  # the schedulers' training timesteps (DDPM cannot take more); 40x the official 25
MAX_LATENT_LENGTH = 64  # 253 video frames; the official length is 9 latents (33 frames), training saw 16
MAX_IMAGES_PER_REQUEST = 64  # prompts x num_images_per_prompt
MAX_PROMPT_CHARS = 4096  # per prompt; the text encoder reads 256 tokens (about 1000 characters), truncating the rest
# The largest HTTP body a valid request can need: a prompt and a negative prompt per image at the cap, each
# character as JSON's longest escape (an astral character is a 12-byte surrogate pair, "\ud83d\ude00"),
# plus room for the numeric options.
MAX_REQUEST_BYTES = 2 * MAX_IMAGES_PER_REQUEST * MAX_PROMPT_CHARS * 12 + (64 << 10)

# The official default; `motion_flow=None` means it. Image checkpoints ignore it, as the official pipeline
# does (its call passes motion_flow=5 to every checkpoint).
DEFAULT_MOTION_FLOW = 5.0
SEED_LIMIT = 2 ** 64  # seeds are 0 <= seed < 2**64 (what torch.Generator.manual_seed takes)


@dataclasses.dataclass(frozen=True)
class Option:
    """One option. type: int or float (a number), str (a string or a list of strings), object (arrays:
    images, latents, text features, checked by `runtime.request`; no command-line flag). None as default
    means unset; `unset` says what None does. maximum: for str, the characters of each string."""

    name: str
    type: type
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    above_minimum: bool = False  # the minimum itself is refused (flow_shift > 0)
    why_maximum: str = ""  # shown when the maximum refuses a value
    unset: str = ""  # what None does, for options that may be None
    build_flag: str | None = None  # the engine build flag that decides whether (or how far) the compiled runner serves it
    metavar: str = "N"

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value: Any, label: str | None = None, why_maximum: str | None = None) -> Any:
        """A number option's value, checked against the type and range -> int or float (None where None is
        allowed); raise ValueError naming `label` (default: the option's name)."""
        label = label or self.name
        if value is None and self.default is None:
            return None
        if self.type is int:
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < self.minimum:
                raise ValueError(f"{label} must be an integer >= {self.minimum}, got {value!r}")
            number = int(value)
        else:
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{label} must be a finite number, got {value!r}")
            number = float(value)
            if self.minimum is not None and (number <= self.minimum if self.above_minimum else number < self.minimum):
                unset = f" (None {self.unset})" if self.unset else ""
                raise ValueError(f"{label} must be {'>' if self.above_minimum else '>='} {self.minimum:g}{unset}, "
                                 f"got {value!r}")
        if self.maximum is not None and number > self.maximum:
            why = why_maximum or self.why_maximum
            raise ValueError(f"{label} must be at most {self.maximum}{f' ({why})' if why else ''}, got {value!r}")
        return number


OPTIONS: dict[str, Option] = {option.name: option for option in (
    Option("prompt", str, None, "what to generate: a string or one per prompt (or prompt_embeds)",
           maximum=MAX_PROMPT_CHARS, build_flag="--prompts", metavar="TEXT"),
    Option("negative_prompt", str, None, "what to steer away from: a string or one per prompt",
           maximum=MAX_PROMPT_CHARS, unset="uses the learned null text", metavar="TEXT"),
    Option("prompt_embeds", object, None, "per prompt, [tokens, text_dim] text features instead of prompt"),
    Option("negative_prompt_embeds", object, None, "per prompt, [tokens, text_dim] features of the negative"),
    Option("num_inference_steps", int, 64, "mask (set-by-set) steps per frame", minimum=1, maximum=MAX_MASK_STEPS,
           build_flag="--min-mask-steps"),
    Option("num_diffusion_steps", int, 25, "denoising steps of the diffusion head per mask step", minimum=1,
           maximum=MAX_DIFFUSION_STEPS, why_maximum="the schedulers' 1000 training timesteps",
           build_flag="--loop-diffusion-steps"),
    Option("guidance_scale", float, 5.0, "classifier-free guidance; <= 1 turns it off", build_flag="--no-cfg",
           metavar="SCALE"),
    Option("guidance_trunc", float, 0.0, "guidance off, for the rest of a mask step, from the first diffusion "
           "timestep below this; 0: never", minimum=0, metavar="T"),
    Option("guidance_renorm", float, 1.0, "< 1: clamp each sample's guided output norm to [renorm, 1] x the "
           "conditional one; >= 1: off", minimum=0, build_flag="--guidance-renorm", metavar="R"),
    Option("image_guidance_scale", float, 0.0, "a third guidance pass (null text with the previous frame); needs "
           "guidance_scale > 1", minimum=0, build_flag="--third-guidance-pass", metavar="SCALE"),
    Option("spatiotemporal_guidance_scale", float, 0.0, "the spatiotemporal third guidance pass; needs "
           "guidance_scale > 1, not with image_guidance_scale", minimum=0, build_flag="--third-guidance-pass",
           metavar="SCALE"),
    Option("flow_shift", float, None, "shifts the flow-matching sigmas (FlowMatch checkpoints)", minimum=0,
           above_minimum=True, unset="keeps the scheduler's shift", metavar="SHIFT"),
    Option("max_latent_length", int, 1, "latent frames: 1 = an image; on video checkpoints n > 1 = 1 + 4 (n - 1) "
           "frames", minimum=1, maximum=MAX_LATENT_LENGTH, build_flag="--latent-capacity"),
    Option("motion_flow", float, None, "motion strength of video checkpoints (image checkpoints ignore it)",
           unset=f"means {DEFAULT_MOTION_FLOW:g}", metavar="FLOW"),
    Option("image", object, None, "image-to-video: the first frame, a uint8 [H, W, 3] picture of any size",
           build_flag="--no-image-to-video"),
    Option("latents", object, None, "prefilled latent frames, each [batch, C, h, w]; the last is frame 0"),
    Option("num_images_per_prompt", int, 1, "samples per prompt (rows are prompt-major)", minimum=1,
           maximum=MAX_IMAGES_PER_REQUEST, build_flag="--images-per-prompt"),
)}

# Not request options, but chosen by the same callers: the draws' seed and a video's frame rate.
SEED = Option("seed", int, None, "seed of every random draw", minimum=0, maximum=SEED_LIMIT - 1,
              unset="draws a random seed")
FPS = Option("fps", int, 12, "mp4 frame rate", minimum=1, maximum=240)
