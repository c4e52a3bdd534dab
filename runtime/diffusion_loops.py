"""The two ways a mask step's diffusion loop runs on the graphs, behind one interface (`DiffusionLoop`):

    UnrolledLoop   denoise_loop: every diffusion step and the placing in one launch (the build's step count)
    PerStepLoop    denoise once per diffusion step, then place (any other step count)

Per request, `diffusion_loop` picks one and uploads the sampler inputs once. Per mask step, `draw` takes the
step's random numbers in the reference's order (the initial noise, then each noise-adding diffusion step's),
each for the whole canvas as the reference draws it, and uploads only the rows the graphs read, all in one
go before the step's launches (an upload waits for the device, so it is done once per step); `run` then
launches the graphs and returns the new canvas.
"""

from __future__ import annotations

import numpy as np

from runtime.backends.base import Backend
from runtime.feeds import gather_rows, grid_rows, sampler_constants
from runtime.graphs.capabilities import BuildCapabilities
from runtime.guidance_plan import GuidancePlan
from runtime.schedules import SamplerTable


class DiffusionLoop:
    """What both strategies share: the sampler table, the guidance, and the draws' shape and rows."""

    def __init__(self, backend: Backend, build: BuildCapabilities, plan: GuidancePlan, sampler: SamplerTable,
                 batch: int, draw_dtype: str, whole_grid: bool = False):
        """batch: the request's samples (draws are for these; rows are padded to the build's);
        draw_dtype: the diffusion head's precision (the reference draws in the model dtype)."""
        self.backend, self.geometry, self.sampler, self.whole_grid = backend, build.geometry, sampler, whole_grid
        g = self.geometry
        self.steps = range(len(sampler.timesteps))
        self.draw_shape, self.draw_dtype = (batch, g.channels, *g.latent_size), draw_dtype
        self.rows = (g.batch, g.num_tokens if whole_grid else g.max_tokens_per_step, g.token_dim)
        self.scales = plan.step_scales(sampler.timesteps)
        self.constants = {k: backend.upload(v) for k, v in sampler_constants(plan, sampler, g, whole_grid).items()}

    def _draw_rows(self, selected: np.ndarray, draws) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """-> the initial noise's rows, and those of each diffusion step that adds noise (by step index)."""
        def rows(noise) -> np.ndarray:
            return grid_rows(noise, self.geometry) if self.whole_grid else gather_rows(noise, selected, self.geometry)

        x = rows(draws.normal(self.draw_shape, self.draw_dtype))
        noise = {j: rows(draws.normal(self.draw_shape, self.draw_dtype)) for j in self.steps
                 if self.sampler.draws_noise(j)}
        return x, noise

    def draw(self, selected: np.ndarray, draws) -> dict:
        """A mask step's draws on the device, as `run` takes them (`selected`: the step's token ids)."""
        raise NotImplementedError

    def run(self, canvas, z_selected, drawn: dict, place: dict):
        """The mask step's diffusion loop and the placing (`place`: selected, valid). -> canvas_out."""
        raise NotImplementedError


class UnrolledLoop(DiffusionLoop):
    """One denoise_loop launch per mask step, fed the whole sampler table and every step's noise at once."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        upload, sampler = self.backend.upload, self.sampler
        self.feeds = {**self.constants, "guidance_scale": upload(self.scales), "timesteps": upload(sampler.timesteps),
                      "coefficients": upload(sampler.coefficients),
                      "noise": upload(np.zeros((len(self.steps), *self.rows), np.float32))}

    def draw(self, selected: np.ndarray, draws) -> dict:
        x, noise = self._draw_rows(selected, draws)
        drawn = {"x": self.backend.upload(x)}
        if noise:  # zeros where a step adds none; without any, the uploaded zeros stay
            zeros = np.zeros(self.rows, np.float32)
            drawn["noise"] = self.backend.upload(np.stack([noise.get(j, zeros) for j in self.steps]))
        return drawn

    def run(self, canvas, z_selected, drawn: dict, place: dict):
        return self.backend.run("denoise_loop", {**self.feeds, **drawn, "canvas": canvas, "z_selected": z_selected,
                                                 **place})["canvas_out"]


class PerStepLoop(DiffusionLoop):
    """One denoise launch per diffusion step (each fed its own table row and noise), then one place."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        upload, sampler = self.backend.upload, self.sampler
        no_noise = upload(np.zeros(self.rows, np.float32))
        scales = {value: upload(np.array([value], np.float32)) for value in set(self.scales.tolist())}  # one per value
        self.feeds = [{**self.constants, "guidance_scale": scales[self.scales[j].item()],
                       "timestep": upload(sampler.timesteps[j:j + 1]), "coefficients": upload(sampler.coefficients[j]),
                       "noise": no_noise} for j in self.steps]

    def draw(self, selected: np.ndarray, draws) -> dict:
        x, noise = self._draw_rows(selected, draws)
        upload = self.backend.upload
        return {"x": upload(x), "noise": {j: upload(rows) for j, rows in noise.items()}}

    def run(self, canvas, z_selected, drawn: dict, place: dict):
        run, x = self.backend.run, drawn["x"]
        for j, feeds in zip(self.steps, self.feeds):
            noise = {"noise": drawn["noise"][j]} if j in drawn["noise"] else {}
            x = run("denoise", {**feeds, **noise, "x": x, "z_selected": z_selected})["x_next"]
        return run("place", {"canvas": canvas, "x": x, **place})["canvas_out"]


def diffusion_loop(backend: Backend, build: BuildCapabilities, plan: GuidancePlan, sampler: SamplerTable,
                   batch: int, draw_dtype: str) -> DiffusionLoop:
    """The strategy for a request: the unrolled loop at the build's step count, else the per-step graphs."""
    steps = len(sampler.timesteps)
    if build.unrolls(steps):
        return UnrolledLoop(backend, build, plan, sampler, batch, draw_dtype, whole_grid=build.whole_grid(steps))
    return PerStepLoop(backend, build, plan, sampler, batch, draw_dtype)
