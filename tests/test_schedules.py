"""Mask schedules and the sampler table against NOVA_SPEC and diffusers' schedulers."""

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from runtime.schedules import SamplerTable, mask_schedule

APPENDIX_A_4096 = [1, 4, 6, 9, 11, 13, 16, 19, 21, 23, 25, 28, 31, 32, 35, 38, 39, 42, 44, 47, 48, 51, 52, 55, 57, 59,
                   61, 63, 64, 67, 68, 71, 72, 73, 76, 77, 78, 80, 81, 83, 85, 85, 87, 88, 89, 91, 91, 93, 93, 94, 95,
                   96, 97, 97, 98, 98, 99, 99, 100, 100, 100, 100, 100, 101]
APPENDIX_A_1440 = [2, 2, 3, 4, 5, 5, 7, 7, 8, 9, 10, 11, 11, 12, 14, 14, 14, 16, 16, 17, 18, 18, 20, 20, 20, 22, 22, 23,
                   23, 24, 25, 25, 26, 26, 27, 28, 28, 29, 29, 30, 30, 30, 31, 32, 31, 32, 33, 33, 33, 33, 34, 34, 34, 34,
                   35, 35, 35, 35, 35, 35, 35, 36, 35]


def test_mask_schedule_matches_spec_appendix():
    assert mask_schedule(4096, 64) == APPENDIX_A_4096
    assert mask_schedule(1440, 64) == APPENDIX_A_1440
    for tokens, steps, peak, effective in ((4096, 128, 51, 127), (1440, 128, 18, 126)):
        schedule = mask_schedule(tokens, steps)
        assert (max(schedule), len(schedule), sum(schedule)) == (peak, effective, tokens)


def test_mask_schedule_rejects_bad_steps():
    with pytest.raises(ValueError, match="num_inference_steps"):
        mask_schedule(16, 0)


def _run_pair(scheduler, steps, seed=0):
    """Step diffusers' scheduler and our table side by side: each step from the same input and noise."""
    table = SamplerTable.from_scheduler(scheduler, steps)
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
    return table


def test_flow_match_table_equals_diffusers_bitwise():
    table = _run_pair(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0), 25)
    assert not table.stochastic and table.timesteps[0] == 1000.0 and table.timesteps[-1] == 1.0


@pytest.mark.parametrize("config", [
    {},  # diffusers defaults: linear betas, epsilon, clip_sample=True, fixed_small, leading
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False},
    {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"},
    {"prediction_type": "sample", "variance_type": "fixed_large", "timestep_spacing": "trailing"},
    {"timestep_spacing": "linspace", "clip_sample_range": 2.0},
])
@pytest.mark.parametrize("steps", [25, 100])
def test_ddpm_table_equals_diffusers_bitwise(config, steps):
    table = _run_pair(DDPMScheduler(**config), steps)
    assert table.stochastic
