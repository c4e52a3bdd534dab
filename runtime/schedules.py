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
    coefficients: torch.Tensor  # [S, 5] float32: a, b, c, d, e
    clip_range: float | None  # None: no clipping
    stochastic: bool  # whether any step adds noise (e != 0)

    @classmethod
    def from_scheduler(cls, scheduler, num_steps: int) -> "SamplerTable":
        if num_steps < 1:
            raise ValueError(f"num_diffusion_steps must be >= 1, got {num_steps}")
        scheduler.set_timesteps(num_steps)
        if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            sigmas = scheduler.sigmas  # fp32, differenced in fp32 as diffusers does: bit-identical steps
            rows = [(0.0, 1.0, float(sigmas[j + 1] - sigmas[j]), 1.0, 0.0) for j in range(num_steps)]
            clip = None
        elif isinstance(scheduler, DDPMScheduler):
            rows, clip = _ddpm_rows(scheduler), (scheduler.config.clip_sample_range if scheduler.config.clip_sample else None)
        else:
            raise TypeError(f"unsupported scheduler {type(scheduler).__name__}")
        coefficients = torch.tensor(rows, dtype=torch.float32)
        return cls(scheduler.timesteps.float(), coefficients, clip, bool((coefficients[:, 4] != 0).any()))

    def step(self, index: int, x: torch.Tensor, model_out: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """One update in fp32, cast back to the model output's dtype (as diffusers does)."""
        a, b, c, d, e = self.coefficients[index].tolist()
        pred = a * x.float() + b * model_out.float()
        if self.clip_range is not None:
            pred = pred.clamp(-self.clip_range, self.clip_range)
        out = c * pred + d * x.float()
        if e:
            out = out + e * noise.float()
        return out.to(model_out.dtype)


def _ddpm_rows(scheduler: DDPMScheduler) -> list[tuple[float, ...]]:
    config, alphas_cumprod = scheduler.config, scheduler.alphas_cumprod.double()
    rows = []
    for t in scheduler.timesteps.tolist():
        prev_t = scheduler.previous_timestep(t)
        prev_t = int(prev_t.item() if torch.is_tensor(prev_t) else prev_t)
        abar = alphas_cumprod[t]
        abar_prev = alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0, dtype=torch.float64)
        beta = 1 - abar / abar_prev
        if config.prediction_type == "epsilon":
            a, b = 1 / abar.sqrt(), -(1 - abar).sqrt() / abar.sqrt()
        elif config.prediction_type == "sample":
            a, b = torch.tensor(0.0), torch.tensor(1.0)
        elif config.prediction_type == "v_prediction":
            a, b = abar.sqrt(), -(1 - abar).sqrt()
        else:
            raise ValueError(f"unsupported DDPM prediction_type {config.prediction_type!r}")
        c = abar_prev.sqrt() * beta / (1 - abar)
        d = (1 - beta).sqrt() * (1 - abar_prev) / (1 - abar)
        if t == 0:
            e = torch.tensor(0.0)
        elif config.variance_type == "fixed_small":
            e = ((1 - abar_prev) / (1 - abar) * beta).clamp(min=1e-20).sqrt()
        else:  # fixed_large
            e = beta.sqrt()
        rows.append(tuple(float(v) for v in (a, b, c, d, e)))
    return rows
