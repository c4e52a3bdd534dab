"""Schedules fixed before generation: tokens per mask step, and the diffusion sampler's coefficients.

The reference pipeline steps diffusers' schedulers directly (that is what the official pipeline
does). Compiled graphs cannot call a scheduler, so `SamplerTable` turns one into a row of
coefficients per diffusion step; one update rule covers flow matching and DDPM:

    pred   = a * x + b * model_out          (x0 for DDPM, the velocity for flow matching)
    pred   = clip(pred, -r, r)              (DDPM with clip_sample only)
    x_next = c * pred + d * x + e * noise
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

SCHEDULERS = {"FlowMatchEulerDiscreteScheduler": FlowMatchEulerDiscreteScheduler, "DDPMScheduler": DDPMScheduler}


def mask_schedule(num_tokens: int, num_steps: int) -> list[int]:
    """Tokens predicted per mask step: a cosine schedule, rounded half-to-even, empty steps dropped."""
    if num_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_steps}")
    ratios = np.cos(0.5 * np.pi * np.arange(num_steps + 1) / num_steps)
    lengths = np.round(ratios * num_tokens).astype(np.int64)
    return [int(n) for n in lengths[:-1] - lengths[1:] if n > 0]


def load_scheduler(folder: str | os.PathLike):
    """The diffusers scheduler named by `scheduler_config.json` in folder, with its config."""
    path = Path(folder) / "scheduler_config.json"
    raw = json.loads(path.read_text())
    name = raw.get("_class_name")
    if name not in SCHEDULERS:
        raise ValueError(f"{path}: unsupported scheduler {name!r} (expected one of {', '.join(SCHEDULERS)})")
    scheduler = SCHEDULERS[name].from_config(raw)
    if name == "FlowMatchEulerDiscreteScheduler" and scheduler.config.get("stochastic_sampling"):
        raise ValueError(f"{path}: stochastic_sampling is not supported")
    if name == "DDPMScheduler":
        if scheduler.config.thresholding:
            raise ValueError(f"{path}: dynamic thresholding is not supported")
        if scheduler.config.variance_type not in ("fixed_small", "fixed_large"):
            raise ValueError(f"{path}: variance_type {scheduler.config.variance_type!r} is not supported")
    return scheduler


@dataclasses.dataclass(frozen=True)
class SamplerTable:
    """Per diffusion step: the model's timestep input and the update coefficients (see module doc)."""

    timesteps: torch.Tensor  # [S] float32, what the diffusion head sees
    coefficients: torch.Tensor  # [S, 6] float32: a, b, r, c, d, e
    clip_range: float | None  # None: no clipping
    stochastic: bool  # whether any step adds noise (e != 0)

    @classmethod
    def from_scheduler(cls, scheduler, num_steps: int) -> "SamplerTable":
        if num_steps < 1:
            raise ValueError(f"num_diffusion_steps must be >= 1, got {num_steps}")
        scheduler.set_timesteps(num_steps)
        if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            sigmas = scheduler.sigmas  # fp32, differenced in fp32 as diffusers does: bit-identical steps
            rows = [(0.0, 1.0, 1.0, float(sigmas[j + 1] - sigmas[j]), 1.0, 0.0) for j in range(num_steps)]
            clip = None
        elif isinstance(scheduler, DDPMScheduler):
            rows, clip = _ddpm_rows(scheduler), (scheduler.config.clip_sample_range if scheduler.config.clip_sample else None)
        else:
            raise TypeError(f"unsupported scheduler {type(scheduler).__name__}")
        coefficients = torch.tensor(rows, dtype=torch.float32)
        return cls(scheduler.timesteps.float(), coefficients, clip, bool((coefficients[:, 5] != 0).any()))

    def draws_noise(self, index: int) -> bool:
        """Whether step `index` adds noise (and so consumes a draw): DDPM at t > 0."""
        return bool(self.coefficients[index, 5] != 0)

    def step(self, index: int, x: torch.Tensor, model_out: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """One update in fp32, cast back to the model output's dtype."""
        a, b, r, c, d, e = (v.reshape(()) for v in self.coefficients[index].split(1))
        x32 = x.float()
        pred = (a * x32 + b * model_out.float()) / r
        if self.clip_range is not None:
            pred = pred.clamp(-self.clip_range, self.clip_range)
        out = c * pred + d * x32
        if noise is not None:
            out = out + e * noise.float()
        return out.to(model_out.dtype)


def _ddpm_rows(scheduler: DDPMScheduler) -> list[tuple[float, ...]]:
    """diffusers' DDPMScheduler.step coefficients, computed with its fp32 operations."""
    config, alphas_cumprod, one = scheduler.config, scheduler.alphas_cumprod, torch.tensor(1.0)
    rows = []
    for t in scheduler.timesteps.tolist():
        prev_t = scheduler.previous_timestep(t)
        prev_t = int(prev_t.item() if torch.is_tensor(prev_t) else prev_t)
        alpha_prod = alphas_cumprod[t]
        alpha_prod_prev = alphas_cumprod[prev_t] if prev_t >= 0 else one
        beta_prod, beta_prod_prev = 1 - alpha_prod, 1 - alpha_prod_prev
        current_alpha = alpha_prod / alpha_prod_prev
        current_beta = 1 - current_alpha
        if config.prediction_type == "epsilon":  # x0 = (x - sqrt(1 - abar) eps) / sqrt(abar)
            a, b, r = one, -(beta_prod**0.5), alpha_prod**0.5
        elif config.prediction_type == "sample":
            a, b, r = 0 * one, one, one
        elif config.prediction_type == "v_prediction":  # x0 = sqrt(abar) x - sqrt(1 - abar) v
            a, b, r = alpha_prod**0.5, -(beta_prod**0.5), one
        else:
            raise ValueError(f"unsupported DDPM prediction_type {config.prediction_type!r}")
        c = (alpha_prod_prev**0.5 * current_beta) / beta_prod
        d = current_alpha**0.5 * beta_prod_prev / beta_prod
        if t == 0:
            e = 0 * one
        elif config.variance_type == "fixed_small":
            e = torch.clamp((1 - alpha_prod_prev) / (1 - alpha_prod) * current_beta, min=1e-20) ** 0.5
        else:  # fixed_large
            e = current_beta**0.5
        rows.append(tuple(float(v) for v in (a, b, r, c, d, e)))
    return rows
