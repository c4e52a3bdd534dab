"""Mask schedules and the sampler table against NOVA_SPEC and diffusers' schedulers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from runtime import schedules
from runtime.configs import scheduler_config
from runtime.schedules import SamplerTable, load_scheduler, mask_schedule

APPENDIX_A_4096 = [1, 4, 6, 9, 11, 13, 16, 19, 21, 23, 25, 28, 31, 32, 35, 38, 39, 42, 44, 47, 48, 51, 52, 55, 57, 59,
                   61, 63, 64, 67, 68, 71, 72, 73, 76, 77, 78, 80, 81, 83, 85, 85, 87, 88, 89, 91, 91, 93, 93, 94, 95,
                   96, 97, 97, 98, 98, 99, 99, 100, 100, 100, 100, 100, 101]
APPENDIX_A_1440 = [2, 2, 3, 4, 5, 5, 7, 7, 8, 9, 10, 11, 11, 12, 14, 14, 14, 16, 16, 17, 18, 18, 20, 20, 20, 22, 22, 23,
                   23, 24, 25, 25, 26, 26, 27, 28, 28, 29, 29, 30, 30, 30, 31, 32, 31, 32, 33, 33, 33, 33, 34, 34, 34, 34,
                   35, 35, 35, 35, 35, 35, 35, 36, 35]
DDPM_CONFIGS = [
    {},  # diffusers defaults: linear betas, epsilon, clip_sample=True, fixed_small, leading
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False},
    {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"},
    {"prediction_type": "sample", "variance_type": "fixed_large", "timestep_spacing": "trailing"},
    {"timestep_spacing": "linspace", "clip_sample_range": 2.0},
]
FLOW_MATCH_CONFIGS = [{"num_train_timesteps": 1000, "shift": 1.0}, {"num_train_timesteps": 1000, "shift": 3.0}]


def test_mask_schedule_matches_spec_appendix():
    assert mask_schedule(4096, 64) == APPENDIX_A_4096
    assert mask_schedule(1440, 64) == APPENDIX_A_1440
    for tokens, steps, peak, effective in ((4096, 128, 51, 127), (1440, 128, 18, 126)):
        schedule = mask_schedule(tokens, steps)
        assert (max(schedule), len(schedule), sum(schedule)) == (peak, effective, tokens)


def test_mask_schedule_rejects_bad_steps():
    with pytest.raises(ValueError, match="num_inference_steps"):
        mask_schedule(16, 0)


# -------------------------------------------------------------------------------------------------
# The oracle: the table as the runtime derived it from a diffusers scheduler before it went torch-free
# -------------------------------------------------------------------------------------------------
def _torch_sqrt(value: torch.Tensor) -> torch.Tensor:
    return value**0.5  # diffusers' own operation


def _exact_sqrt(value: torch.Tensor) -> torch.Tensor:
    """The correctly rounded float32 square root (the float64 one rounded: exact for float32 inputs), as numpy
    takes it. Torch's float32 sqrt on x86 is MKL's and is not correctly rounded on every CPU (on AMD EPYC it is
    1 ulp off for about a fifth of inputs), so diffusers' DDPM values are that CPU's, not IEEE's."""
    return value.double().sqrt().float()




def _unfused_linspace(start: float, end: float, num: int) -> np.ndarray:
    """torch.linspace in float32 as its CPU kernel computes it without fused multiply-adds."""
    first, last, index = np.float32(start), np.float32(end), np.arange(num, dtype=np.float32)
    step = (last - first) / np.float32(num - 1)
    return np.where(index < num // 2, first + step * index, last - step * (np.float32(num - 1) - index))


# torch's float32 linspace (DDPM's linear betas) is fused in its AVX2/AVX-512 kernels, as the table computes it, and
# not in the default one (e.g. ATEN_CPU_CAPABILITY=default): there the two differ in the last bit at some betas
TORCH_LINSPACE_IS_UNFUSED = np.array_equal(torch.linspace(1e-4, 0.02, 1000).numpy(),
                                           _unfused_linspace(1e-4, 0.02, 1000))


def _skip_where_torch_linspace_is_unfused(config: dict) -> None:
    if TORCH_LINSPACE_IS_UNFUSED and config.get("beta_schedule", "linear") in ("linear", "scaled_linear"):
        pytest.skip("this torch's float32 linspace kernel is not fused: its linear betas are not the table's")


def _derived_table(scheduler, num_steps: int, sqrt=_torch_sqrt) -> SamplerTable:
    """The table from diffusers' scheduler state after set_timesteps, with diffusers' fp32 torch operations."""
    scheduler.set_timesteps(num_steps)
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        sigmas = scheduler.sigmas
        rows = [(0.0, 1.0, 1.0, float(sigmas[j + 1] - sigmas[j]), 1.0, 0.0) for j in range(num_steps)]
        clip = None
    else:
        rows = _derived_ddpm_rows(scheduler, sqrt)
        clip = scheduler.config.clip_sample_range if scheduler.config.clip_sample else None
    coefficients = torch.tensor(rows, dtype=torch.float32).numpy()
    return SamplerTable(scheduler.timesteps.float().numpy(), coefficients, clip)


def _derived_ddpm_rows(scheduler: DDPMScheduler, sqrt) -> list[tuple[float, ...]]:
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
        if config.prediction_type == "epsilon":
            a, b, r = one, -sqrt(beta_prod), sqrt(alpha_prod)
        elif config.prediction_type == "sample":
            a, b, r = 0 * one, one, one
        else:
            a, b, r = sqrt(alpha_prod), -sqrt(beta_prod), one
        c = (sqrt(alpha_prod_prev) * current_beta) / beta_prod
        d = sqrt(current_alpha) * beta_prod_prev / beta_prod
        if t == 0:
            e = 0 * one
        elif config.variance_type == "fixed_small":
            e = sqrt(torch.clamp((1 - alpha_prod_prev) / (1 - alpha_prod) * current_beta, min=1e-20))
        else:
            e = sqrt(current_beta)
        rows.append(tuple(float(v) for v in (a, b, r, c, d, e)))
    return rows


def _config(scheduler) -> dict:
    return {**scheduler.config, "_class_name": type(scheduler).__name__}


def _stochastic(table: SamplerTable) -> bool:
    return any(table.draws_noise(j) for j in range(len(table.timesteps)))


def _assert_same_table(ours: SamplerTable, oracle: SamplerTable, label: str = "") -> None:
    assert ours.timesteps.dtype == ours.coefficients.dtype == np.float32, label
    assert np.array_equal(ours.timesteps, oracle.timesteps), label
    assert np.array_equal(ours.coefficients, oracle.coefficients), label
    assert ours.clip_range == oracle.clip_range, label


def _run_pair(scheduler, table: SamplerTable, steps: int, seed: int = 0) -> None:
    """Step diffusers' scheduler and a table side by side: each step from the same input and noise."""
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    theirs = x
    for j, t in enumerate(scheduler.timesteps):
        assert float(table.timesteps[j]) == float(t)
        model_out = torch.randn(x.shape, generator=gen)
        state = gen.get_state()
        previous, theirs = theirs, scheduler.step(model_out, t, theirs, generator=gen).prev_sample
        gen.set_state(state)  # our step draws the same noise, only where diffusers draws it
        noise = torch.randn(x.shape, generator=gen) if table.draws_noise(j) else None
        ours = table.step(j, previous, model_out, noise)
        assert gen.get_state().equal(state) == (noise is None)  # same RNG consumption
        assert torch.equal(ours, theirs)  # bit for bit in fp32


# -------------------------------------------------------------------------------------------------
# The numpy table against diffusers
# -------------------------------------------------------------------------------------------------
def test_flow_match_table_equals_diffusers_bitwise():
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    table = SamplerTable.from_config(_config(scheduler), 25)
    _run_pair(scheduler, table, 25)
    assert not _stochastic(table) and table.timesteps[0] == 1000.0 and table.timesteps[-1] == 1.0


@pytest.mark.parametrize("config_shift", [1.0, 3.0])
@pytest.mark.parametrize("flow_shift", [0.5, 3, 7.25])
def test_flow_shift_equals_diffusers_set_shift_bitwise(config_shift, flow_shift):
    """The official pipeline's `flow_shift`: `scheduler.set_shift(flow_shift)`, then `set_timesteps`."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=config_shift)
    table = SamplerTable.from_config(_config(scheduler), 25, flow_shift)
    scheduler.set_shift(flow_shift)
    _run_pair(scheduler, table, 25)
    for steps in (1, 2, 25, 100):
        _assert_same_table(SamplerTable.from_config(_config(scheduler), steps, flow_shift),
                           _derived_table(scheduler, steps), f"{steps} steps")
    unshifted = SamplerTable.from_config(_config(scheduler), 25)
    assert np.array_equal(table.timesteps, unshifted.timesteps) == (flow_shift == config_shift)


def test_flow_shift_is_refused_for_ddpm():
    with pytest.raises(ValueError, match="^flow_shift needs a flow-matching scheduler; this checkpoint samples with "
                                         "DDPMScheduler"):
        SamplerTable.from_config({"_class_name": "DDPMScheduler"}, 10, flow_shift=3.0)


@pytest.mark.parametrize("config", DDPM_CONFIGS)
@pytest.mark.parametrize("steps", [25, 100])
def test_ddpm_table_equals_diffusers_bitwise(config, steps):
    scheduler = DDPMScheduler(**config)
    table = SamplerTable.from_config(_config(scheduler), steps)
    _run_pair(scheduler, table, steps)  # with torch installed the table takes torch's sqrt and linspace
    _assert_same_table(table, _derived_table(scheduler, steps))
    assert _stochastic(table)


@pytest.mark.parametrize("config", DDPM_CONFIGS)
def test_ddpm_table_without_torch_is_the_derivation_with_exact_sqrt(config, monkeypatch):
    """Without torch: numpy's correctly rounded sqrt and the fused linspace (torch's AVX2/AVX-512 kernel)."""
    _skip_where_torch_linspace_is_unfused(config)
    monkeypatch.setattr(schedules, "_torch", lambda: None)
    scheduler = DDPMScheduler(**config)
    for steps in (1, 25, 100):
        _assert_same_table(SamplerTable.from_config(_config(scheduler), steps),
                           _derived_table(scheduler, steps, _exact_sqrt), f"{steps} steps")


@pytest.mark.parametrize("kind, config", [(FlowMatchEulerDiscreteScheduler, c) for c in FLOW_MATCH_CONFIGS]
                         + [(DDPMScheduler, c) for c in DDPM_CONFIGS])
def test_table_equals_the_diffusers_derivation_for_1_to_200_steps(kind, config):
    scheduler = kind(**config)
    for steps in range(1, 201):
        if scheduler.config.get("timestep_spacing") == "trailing" and steps in (61, 103, 121, 122):
            # numpy's float arange gives diffusers one step more there, at timestep -1: refused
            scheduler.set_timesteps(steps)
            assert len(scheduler.timesteps) == steps + 1 and scheduler.timesteps[-1] == -1
            with pytest.raises(ValueError, match="choose another number of steps"):
                SamplerTable.from_config(_config(scheduler), steps)
            continue
        _assert_same_table(SamplerTable.from_config(_config(scheduler), steps),
                           _derived_table(scheduler, steps), f"{steps} steps")


def test_from_config_fills_diffusers_defaults_and_rejects_bad_steps():
    defaults = SamplerTable.from_config({"_class_name": "DDPMScheduler"}, 10)
    _assert_same_table(defaults, SamplerTable.from_config(_config(DDPMScheduler()), 10))
    assert defaults.clip_range == 1.0
    with pytest.raises(ValueError, match="num_diffusion_steps must be >= 1"):
        SamplerTable.from_config({"_class_name": "FlowMatchEulerDiscreteScheduler"}, 0)
    with pytest.raises(ValueError, match="exceeds the scheduler's 1000 training timesteps"):
        SamplerTable.from_config({"_class_name": "DDPMScheduler"}, 1001)


# -------------------------------------------------------------------------------------------------
# Configs: read without torch, refused where the table would not be diffusers' schedule
# -------------------------------------------------------------------------------------------------
def _folder(tmp_path: Path, config: dict) -> Path:
    (tmp_path / "scheduler_config.json").write_text(json.dumps(config))
    return tmp_path


def test_scheduler_config_reads_completes_and_matches_load_scheduler(tmp_path):
    folder = _folder(tmp_path, {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.31.0",
                                "shift": 3.0})
    config = scheduler_config(folder)
    assert config["shift"] == 3.0 and config["num_train_timesteps"] == 1000 and not config["use_dynamic_shifting"]
    scheduler = load_scheduler(config)
    assert isinstance(scheduler, FlowMatchEulerDiscreteScheduler) and scheduler.config.shift == 3.0
    _assert_same_table(SamplerTable.from_config(config, 30), SamplerTable.from_config(_config(scheduler), 30))


@pytest.mark.parametrize("config, message", [
    ({"_class_name": "EulerDiscreteScheduler"}, "unsupported scheduler 'EulerDiscreteScheduler'"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "stochastic_sampling": True}, "stochastic_sampling"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True}, "use_dynamic_shifting"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_karras_sigmas": True}, "use_karras_sigmas"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_exponential_sigmas": True}, "use_exponential_sigmas"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_beta_sigmas": True}, "use_beta_sigmas"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "invert_sigmas": True}, "invert_sigmas"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift_terminal": 0.1}, "shift_terminal"),
    ({"_class_name": "DDPMScheduler", "thresholding": True}, "dynamic thresholding"),
    ({"_class_name": "DDPMScheduler", "variance_type": "learned_range"}, "variance_type 'learned_range'"),
    ({"_class_name": "DDPMScheduler", "rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
    ({"_class_name": "DDPMScheduler", "trained_betas": [0.1, 0.2]}, "trained_betas"),
    ({"_class_name": "DDPMScheduler", "beta_schedule": "sigmoid"}, "beta_schedule 'sigmoid'"),
    ({"_class_name": "DDPMScheduler", "timestep_spacing": "karras"}, "timestep_spacing 'karras'"),
    ({"_class_name": "DDPMScheduler", "prediction_type": "flow"}, "prediction_type 'flow'"),
])
def test_unsupported_options_are_refused_by_name(tmp_path, config, message):
    folder = _folder(tmp_path, config)
    with pytest.raises(ValueError, match=f"scheduler_config.json: .*{message}"):
        scheduler_config(folder)
    with pytest.raises(ValueError, match=message):
        SamplerTable.from_config(config, 10)


def test_schedules_import_and_compute_without_torch_or_diffusers():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['diffusers'] = None\n"
            "from runtime.configs import scheduler_config\n"
            "from runtime.schedules import SamplerTable, mask_schedule\n"
            "t = SamplerTable.from_config({'_class_name': 'DDPMScheduler'}, 25)\n"
            "f = SamplerTable.from_config({'_class_name': 'FlowMatchEulerDiscreteScheduler', 'shift': 3.0}, 25)\n"
            "assert t.coefficients.shape == (25, 6) and t.draws_noise(0) and not t.draws_noise(24)\n"
            "assert f.timesteps[0] == 1000 and not f.draws_noise(0) and sum(mask_schedule(64, 8)) == 64\n"
            "print('ok')\n")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
