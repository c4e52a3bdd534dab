"""Schedules fixed before generation: tokens per mask step, and the diffusion sampler's coefficients.

Compiled graphs cannot call a scheduler, so `SamplerTable` turns the scheduler's config into a row of
coefficients per diffusion step; one update rule covers flow matching and DDPM:

    pred   = a * x + b * model_out          (x0 for DDPM, the velocity for flow matching)
    pred   = clip(pred, -r, r)              (DDPM with clip_sample only)
    x_next = c * pred + d * x + e * noise

The table is computed in numpy, so a TensorRT or ONNX Runtime deployment needs neither torch nor
diffusers, and the reference pipeline steps the same table. It repeats diffusers' float32 operations in
their order, so its values are bit for bit those of diffusers' FlowMatchEulerDiscreteScheduler and
DDPMScheduler after `set_timesteps`. Two of torch's float32 primitives that DDPM uses are host-dependent
in the last bit: sqrt (MKL's on x86; on AMD EPYC about a fifth of results are 1 ulp off the correctly
rounded value) and linspace (fused multiply-adds in AVX2/AVX-512 builds only). Where torch is installed
the table takes those two from torch, so it equals diffusers on every host; without torch it takes
numpy's correctly rounded sqrt and a fused linspace, within a few ulp of torch's. Options that change
the schedule and are not repeated here are refused.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

if TYPE_CHECKING:
    import torch

FLOW_MATCH, DDPM = "FlowMatchEulerDiscreteScheduler", "DDPMScheduler"

# diffusers' defaults for the options read or refused here
DEFAULTS: dict[str, dict[str, Any]] = {
    FLOW_MATCH: {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False, "invert_sigmas": False,
                 "shift_terminal": None, "use_karras_sigmas": False, "use_exponential_sigmas": False,
                 "use_beta_sigmas": False, "stochastic_sampling": False},
    DDPM: {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
           "trained_betas": None, "variance_type": "fixed_small", "clip_sample": True, "prediction_type": "epsilon",
           "thresholding": False, "clip_sample_range": 1.0, "timestep_spacing": "leading", "steps_offset": 0,
           "rescale_betas_zero_snr": False},
}
# options refused when set (not None, False or 0)
_REFUSED = {
    FLOW_MATCH: ("stochastic_sampling", "use_dynamic_shifting", "invert_sigmas", "shift_terminal", "use_karras_sigmas",
                 "use_exponential_sigmas", "use_beta_sigmas"),
    DDPM: ("thresholding", "trained_betas", "rescale_betas_zero_snr"),
}
_LABELS = {"thresholding": "dynamic thresholding"}  # what a refusal calls an option, where not its own name
# options with the values implemented (sigmoid betas come from torch.sigmoid, whose float32 rounding numpy does not
# repeat; laplace betas are not implemented)
_CHOICES = {
    FLOW_MATCH: {},
    DDPM: {"beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
           "prediction_type": ("epsilon", "sample", "v_prediction"),
           "variance_type": ("fixed_small", "fixed_large"),
           "timestep_spacing": ("leading", "linspace", "trailing")},
}


def mask_schedule(num_tokens: int, num_steps: int) -> list[int]:
    """Tokens predicted per mask step: a cosine schedule, rounded half-to-even, empty steps dropped."""
    if num_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_steps}")
    ratios = np.cos(0.5 * np.pi * np.arange(num_steps + 1) / num_steps)
    lengths = np.round(ratios * num_tokens).astype(np.int64)
    return [int(n) for n in lengths[:-1] - lengths[1:] if n > 0]


def checked_config(config: Mapping[str, Any], source: str = "scheduler config") -> dict[str, Any]:
    """The config with diffusers' defaults filled in, after refusing what `SamplerTable` cannot reproduce.

    Refusing here (not silently computing another schedule) keeps the table equal to diffusers' scheduler."""
    name = config.get("_class_name")
    if name not in DEFAULTS:
        raise ValueError(f"{source}: unsupported scheduler {name!r} (expected one of {', '.join(DEFAULTS)})")
    full = {**DEFAULTS[name], **config}
    for option in _REFUSED[name]:
        if full[option] not in (None, False):  # 0 == False: diffusers tests these for truth
            raise ValueError(f"{source}: {_LABELS.get(option, option)} is not supported")
    for option, choices in _CHOICES[name].items():
        if full[option] not in choices:
            raise ValueError(f"{source}: {option} {full[option]!r} is not supported (expected one of "
                             f"{', '.join(choices)})")
    return full


def load_scheduler(config: Mapping[str, Any]):
    """The diffusers scheduler of a checked scheduler config (`runtime.configs.scheduler_config`): what the
    official pipeline steps."""
    import diffusers

    return getattr(diffusers, config["_class_name"]).from_config(config)


@dataclasses.dataclass(frozen=True)
class SamplerTable:
    """Per diffusion step: the model's timestep input and the update coefficients (see module doc)."""

    timesteps: np.ndarray  # [S] float32, what the diffusion head sees
    coefficients: np.ndarray  # [S, 6] float32: a, b, r, c, d, e
    clip_range: float | None  # None: no clipping

    @classmethod
    def from_config(cls, config: Mapping[str, Any], num_steps: int, flow_shift: float | None = None) -> "SamplerTable":
        """The table of `num_steps` steps for a scheduler config (`scheduler_config`, or a diffusers `.config`
        with its `_class_name`). `flow_shift` is the official call option: the pipeline hands it to the
        flow-matching scheduler's `set_shift` before `set_timesteps`, so it replaces the config's shift in
        the schedule's second shift only (the end points keep the config's)."""
        if num_steps < 1:
            raise ValueError(f"num_diffusion_steps must be >= 1, got {num_steps}")
        config = checked_config(config)
        if flow_shift is not None and config["_class_name"] != FLOW_MATCH:
            raise ValueError(f"flow_shift needs a flow-matching scheduler; this checkpoint samples with "
                             f"{config['_class_name']} (the official pipeline fails on it too)")
        if config["_class_name"] == FLOW_MATCH:
            timesteps, coefficients = _flow_match_table(config, num_steps, flow_shift)
            clip = None
        else:
            timesteps, coefficients = _ddpm_table(config, num_steps)
            clip = float(config["clip_sample_range"]) if config["clip_sample"] else None
        return cls(timesteps, coefficients, clip)

    def draws_noise(self, index: int) -> bool:
        """Whether step `index` adds noise (and so consumes a draw): DDPM at t > 0."""
        return bool(self.coefficients[index, 5] != 0)

    def step(self, index: int, x: torch.Tensor, model_out: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """One update of torch tensors (the reference pipeline's) in fp32, cast back to the model output's dtype."""
        import torch

        a, b, r, c, d, e = torch.from_numpy(self.coefficients[index]).unbind()
        x32 = x.float()
        pred = (a * x32 + b * model_out.float()) / r
        if self.clip_range is not None:
            pred = pred.clamp(-self.clip_range, self.clip_range)
        out = c * pred + d * x32
        if noise is not None:
            out = out + e * noise.float()
        return out.to(model_out.dtype)


# -------------------------------------------------------------------------------------------------
# diffusers' schedules, repeated in numpy with the same float32 (or float64) operations in the same order
# -------------------------------------------------------------------------------------------------
def _flow_match_table(config: dict[str, Any], num_steps: int,
                      flow_shift: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """FlowMatchEulerDiscreteScheduler: x_next = x + (sigma_next - sigma) * velocity."""
    train, shift = config["num_train_timesteps"], config["shift"]
    # The constructor shifts the training sigmas in float32; set_timesteps spaces between its first and last
    # in float64 and shifts those again (diffusers shifts twice), then rounds to float32. `set_shift` changes
    # the shift of the second time only.
    ends = np.array([train, 1], np.float32) / np.float32(train)
    ends = np.float32(shift) * ends / (np.float32(1) + np.float32(shift - 1) * ends)
    sigmas = np.linspace(float(ends[0]) * train, float(ends[1]) * train, num_steps) / train
    shift = shift if flow_shift is None else float(flow_shift)
    sigmas = np.append((shift * sigmas / (1 + (shift - 1) * sigmas)).astype(np.float32), np.float32(0))
    rows = np.zeros((num_steps, 6), np.float32)
    rows[:, [1, 2, 4]] = 1  # a = 0, b = r = d = 1, e = 0
    rows[:, 3] = sigmas[1:] - sigmas[:-1]  # differenced in float32, as the step does
    return sigmas[:-1] * np.float32(train), rows


def _ddpm_table(config: dict[str, Any], num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """DDPMScheduler.step's coefficients: x0 from the prediction, then the posterior mean plus its deviation."""
    steps = _ddpm_timesteps(config, num_steps)
    betas = _ddpm_betas(config)
    # torch.cumprod on CPU multiplies float32 values in a float64 accumulator
    alphas_cumprod = np.cumprod((np.float32(1) - betas).astype(np.float64)).astype(np.float32)
    one = np.float32(1)
    alpha = alphas_cumprod[steps]
    previous = np.append(steps[1:], -1)
    alpha_prev = np.where(previous >= 0, alphas_cumprod[previous], one)
    beta, beta_prev = one - alpha, one - alpha_prev
    current_alpha = alpha / alpha_prev
    current_beta = one - current_alpha
    ones, zeros = np.ones_like(alpha), np.zeros_like(alpha)
    if config["prediction_type"] == "epsilon":  # x0 = (x - sqrt(1 - abar) eps) / sqrt(abar)
        a, b, r = ones, -_sqrt(beta), _sqrt(alpha)
    elif config["prediction_type"] == "sample":
        a, b, r = zeros, ones, ones
    else:  # v_prediction: x0 = sqrt(abar) x - sqrt(1 - abar) v
        a, b, r = _sqrt(alpha), -_sqrt(beta), ones
    c = _sqrt(alpha_prev) * current_beta / beta
    d = _sqrt(current_alpha) * beta_prev / beta
    if config["variance_type"] == "fixed_small":
        variance = np.maximum(beta_prev / beta * current_beta, np.float32(1e-20))
    else:  # fixed_large
        variance = current_beta
    e = np.where(steps > 0, _sqrt(variance), zeros)  # no noise at t = 0
    return steps.astype(np.float32), np.stack([a, b, r, c, d, e], axis=1)


def _ddpm_timesteps(config: dict[str, Any], num_steps: int) -> np.ndarray:
    """DDPMScheduler.set_timesteps: integer timesteps, descending."""
    train, spacing = config["num_train_timesteps"], config["timestep_spacing"]
    if num_steps > train:
        raise ValueError(f"num_diffusion_steps {num_steps} exceeds the scheduler's {train} training timesteps")
    if spacing == "leading":
        steps = np.arange(num_steps - 1, -1, -1) * (train // num_steps) + config["steps_offset"]
    elif spacing == "linspace":
        steps = np.linspace(0, train - 1, num_steps).round()[::-1].astype(np.int64)
    else:  # trailing
        steps = np.round(np.arange(train, 0, -train / num_steps)).astype(np.int64) - 1
    if steps.min() < 0 or steps.max() >= train or len(steps) != num_steps:
        # e.g. trailing with 61 of 1000: numpy's float arange gives one step more, at timestep -1
        raise ValueError(f"{spacing!r} timestep spacing with {num_steps} steps gives diffusers {len(steps)} timesteps "
                         f"from {steps[0]} down to {steps[-1]}, not {num_steps} in [0, {train}); choose another "
                         f"number of steps")
    return steps


def _ddpm_betas(config: dict[str, Any]) -> np.ndarray:
    """DDPMScheduler's float32 betas."""
    train, start, end = config["num_train_timesteps"], config["beta_start"], config["beta_end"]
    if config["beta_schedule"] == "linear":
        return _linspace(start, end, train)
    if config["beta_schedule"] == "scaled_linear":
        return np.square(_linspace(start**0.5, end**0.5, train))

    def alpha_bar(t: float) -> float:  # squaredcos_cap_v2 (Glide), in Python floats as diffusers computes it
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / train) / alpha_bar(i / train), 0.999)
                     for i in range(train)]).astype(np.float32)


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _sqrt(values: np.ndarray) -> np.ndarray:
    """float32 square roots as diffusers takes them (`** 0.5` in torch), numpy's without torch."""
    torch = _torch()
    return np.sqrt(values) if torch is None else (torch.from_numpy(np.asarray(values, np.float32)) ** 0.5).numpy()


def _linspace(start: float, end: float, num: int) -> np.ndarray:
    """torch.linspace(start, end, num, dtype=torch.float32): torch's own, or its fused kernel's values."""
    torch = _torch()
    if torch is None:
        return _fused_linspace_f32(start, end, num)
    return torch.linspace(start, end, num, dtype=torch.float32).numpy()


def _fused_linspace_f32(start: float, end: float, num: int) -> np.ndarray:
    """torch.linspace(start, end, num, dtype=torch.float32) as torch's CPU kernel computes it.

    The kernel takes a float32 step, then start + step * i for the first half and end - step * (num - 1 - i)
    for the rest; its AVX2/AVX-512 builds fuse each into one multiply-add, rounded once to float32. Here
    that value is formed exactly in float64 (checked) and rounded once. Torch's non-FMA build
    (ATEN_CPU_CAPABILITY=default) rounds twice and differs in the last bit at some entries."""
    first, last = np.float32(start), np.float32(end)
    if num == 1:
        return np.array([first])
    step = (last - first) / np.float32(num - 1)
    index = np.arange(num)
    low = index < num // 2
    base = np.where(low, first, last).astype(np.float64)
    offset = np.float64(step) * np.where(low, index, index - (num - 1))  # exact: a 24-bit step times an index
    total = base + offset
    if not (np.array_equal(total - base, offset) and np.array_equal(total - offset, base)):  # a rounded sum
        raise ValueError(f"betas linspace({start}, {end}, {num}) cannot be reproduced bit-exactly in float32")
    return total.astype(np.float32)
