"""`NOVARunner`: the frame / set / denoise loops over compiled graphs.

Per request, everything that does not depend on model outputs is prepared first and uploaded once:
token ids, the mask schedule, the random token order and every mask step's index inputs, the sampler
table (`runtime.feeds`). Each step then feeds device arrays to a graph and hands its outputs to the next:

    text_encoder -> temporal_prefill / temporal_step (KV cache in, KV cache out)    per latent frame
                 -> spatial -> denoise_loop                                        per mask step
                 -> vae_decoder (per sample; per window of 5 latents for the video VAE)

`denoise_loop` is the mask step's whole diffusion loop (S diffusion steps of the head with CFG, the
sampler update, the noise) and the placing of its tokens, unrolled for the build's S
(`BuildProfile.diffusion_steps`): 2 launches per mask step. A request with another num_diffusion_steps
runs the single-step graphs instead, one launch per diffusion step: spatial -> denoise x S -> place
(`runtime.diffusion_loops`: the two strategies, and when each mask step's noise is drawn and uploaded).

Its parts: `runtime.backends.open` opens a build, `runtime.graphs.capabilities` refuses what the build
cannot serve, `runtime.guidance_plan` decides the guidance rows and scales, `runtime.decoder` decodes,
`runtime.draws.call_draws` picks a call's random numbers, `runtime.progress` reports steps and stage times.
The loops are identical for every backend (torch, onnxruntime, tensorrt), so they are tested on CPU.
With the same seed the random draws equal the reference pipeline's (torch.Generator; the draws
follow the official order), so runner and reference agree to rounding. Over an engine folder with
the tensorrt or onnxruntime backend the runner needs neither torch nor the other backend's library.
Where torch is installed it is still used for the draws (torch.Generator, the reference's numbers)
and the sampler table (torch's float32 sqrt and linspace, as diffusers computes them); without it,
seeds draw from numpy instead (`runtime.draws.NumpyDraws`).
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Callable, Generator, Iterator, Sequence

import numpy as np
import PIL.Image
from tqdm.auto import tqdm

from runtime import feeds
from runtime.backends.base import Backend
from runtime.backends.open import open_checkpoint, open_engines
from runtime.cancellation import NEVER, StopSignal
from runtime.configs import CheckpointConfigs
from runtime.decoder import Decoder
from runtime.diffusion_loops import DiffusionLoop, diffusion_loop
from runtime.draws import NumpyDraws, RandomDraws, call_draws, installed_torch
from runtime.graphs.capabilities import BuildCapabilities
from runtime.graphs.profile import BuildProfile, Geometry, frame_position
from runtime.progress import Progress, StageTimer, StepCounter
from runtime.request import Request, validate_request
from runtime.schedules import SamplerTable, mask_schedule

STAGES = ("text", "temporal", "spatial", "denoise", "vae")


@dataclasses.dataclass
class RunnerOutput:
    latents: np.ndarray  # [B, C, T, h, w] float32 scaled latents
    images: np.ndarray | list | None = None  # [B, H, W, 3] uint8 (image VAE), or PIL images (output_type "pil")
    frames: np.ndarray | None = None  # [B, T', H, W, 3] uint8 (video VAE)
    timings: dict[str, float] | None = None  # seconds per stage, on request


@dataclasses.dataclass(frozen=True)
class _Plan:
    """A validated request and what follows from it alone, computed once."""

    request: Request
    schedule: list[int]  # tokens predicted per mask step
    sampler: SamplerTable


class NOVARunner:
    """Generates images and videos from a set of graphs built for one checkpoint and build profile.

    Calls are serialized with a lock, so one runner may be shared by threads; runners share nothing.
    """

    def __init__(self, backend: Backend, configs: CheckpointConfigs, profile: BuildProfile, graphs: dict[str, dict]):
        """backend: runs the graphs; configs: the checkpoint's configs, scheduler and tokenizer (a checkpoint
        folder or an engine folder's copy); graphs: each graph's declaration (`GraphSpec.describe()`: I/O
        names, dtypes, shapes, precision), as the manifest records it."""
        from runtime.tokenizer import PromptTokenizer

        self.backend, self.configs, self.profile, self.graphs = backend, configs, profile, dict(graphs)
        self.config = configs.transformer
        self.geometry = Geometry.from_config(self.config, profile)
        self.build = BuildCapabilities(profile, self.geometry, frozenset(self.graphs), configs.video_vae)
        self.tokenizer = PromptTokenizer.from_folder(configs.tokenizer)
        self._draw_dtype = self.graphs["denoise"]["precision"]  # draws in the head's dtype, as the reference
        self._torch = installed_torch()  # imported now: a first request's timing is the generation's alone
        self._lock = threading.Lock()
        missing = [name for name in self.graphs if name not in backend.graphs]
        if missing:
            raise ValueError(f"the {backend.name} backend lacks graphs: {', '.join(missing)}")

    @classmethod
    def from_checkpoint(cls, folder: str | Path, profile: BuildProfile | None = None, precision: str = "fp32",
                        device: str = "cpu", compile: bool = False) -> "NOVARunner":
        """The torch backend straight from a checkpoint folder (no export): the graphs' own modules. `compile`:
        the per-step graphs through torch.compile (inductor), compiled on the first request (benchmarks/README.md)."""
        return cls(*open_checkpoint(folder, profile, precision, device, compile))

    @classmethod
    def from_engines(cls, folder: str | Path, backend: str = "auto", device: str | None = None,
                     compile: bool = False) -> "NOVARunner":
        """Load an engine folder built by `export/build_engines.py`.

        backend: "auto" (TensorRT if the folder has engines, TensorRT is importable and the device is not
        "cpu"; else ONNX Runtime), "tensorrt", "onnxruntime", or "torch" (the graphs' PyTorch modules,
        weights from the checkpoint the folder was built from). device: "cpu", "cuda" or "cuda:N"; by
        default "cuda" for TensorRT and "cpu" for the others. Every artifact is checked against the
        manifest (size and sha256) before use; a missing, partial, edited or mismatched folder is refused
        with a message that says what to rebuild. The folder is self-contained for tensorrt and
        onnxruntime: configs and tokenizer are read from its configs/ copy, and neither torch nor the
        checkpoint is needed. compile: with backend="torch", as `from_checkpoint`'s.
        """
        return cls(*open_engines(folder, backend, device, compile))

    # -- public API -----------------------------------------------------------------------------------
    def __call__(self, prompt: str | Sequence[str] | None = None, *, seed: int | None = None, generator=None,
                 draws: RandomDraws | NumpyDraws | None = None, output_type: str = "np", return_timings: bool = False,
                 progress: bool = False, disable_progress_bar: bool | None = None, stop: StopSignal = NEVER,
                 on_step: Callable[[Progress], None] | None = None, **options) -> RunnerOutput:
        """Generate. options: those of the official pipeline with its defaults (`runtime.request.validate_request`,
        the README's table): negative_prompt, num_inference_steps, num_diffusion_steps, guidance_scale,
        guidance_trunc, flow_shift, max_latent_length, motion_flow, image, latents, num_images_per_prompt,
        prompt_embeds, negative_prompt_embeds, and image_guidance_scale or spatiotemporal_guidance_scale on a
        build with the third guidance pass, guidance_renorm on a build with the whole-grid loop (--guidance-renorm).
        seed or generator (a torch.Generator) or draws: the random numbers. output_type: "np" (uint8 arrays, what a
        service needs), "pil" (images as PIL images; a video's frames stay arrays, as officially) or "latent"
        (latents only, nothing decoded). return_timings: seconds per stage in the output; progress (or the
        official disable_progress_bar=False): a progress bar over the mask steps (on stderr). stop: a cancel
        event and deadline, checked at every mask step and video window (`runtime.cancellation`: it raises
        Cancelled or DeadlineExceeded, and the runner is ready for the next call). on_step: called with a
        `Progress` after every mask step, in the calling thread (a service's progress reports)."""
        if output_type not in ("np", "pil", "latent"):
            raise ValueError(f"output_type must be 'np', 'pil' or 'latent', got {output_type!r} (the compiled VAE "
                             f"graphs emit uint8 pixels: for 'pt' use runtime.reference.ReferencePipeline)")
        plan, draws = self._plan(prompt, options), draws or call_draws(seed, generator, self._torch)
        progress = progress if disable_progress_bar is None else not disable_progress_bar
        timer, chunks = StageTimer(self.backend, return_timings), []
        with self._lock:
            latents = _drain(self._generate(plan, draws, timer, stop, progress, on_step, output_type != "latent"),
                             chunks.append)
        timings = dict(timer.seconds) if return_timings else None
        if output_type == "latent":
            return RunnerOutput(latents=latents, timings=timings)
        decoded = np.concatenate(chunks, axis=1 if chunks[0].ndim == 5 else 0)
        if decoded.ndim == 5:
            return RunnerOutput(latents=latents, frames=decoded, timings=timings)
        return RunnerOutput(latents=latents, timings=timings, images=decoded if output_type == "np" else
                            [PIL.Image.fromarray(image) for image in decoded])

    def stream(self, prompt: str | Sequence[str] | None = None, *, seed: int | None = None, generator=None,
               draws: RandomDraws | NumpyDraws | None = None, stop: StopSignal = NEVER,
               on_step: Callable[[Progress], None] | None = None, **options) -> Iterator[np.ndarray]:
        """Yield decoded pixels as soon as they exist: the images, or each window of video frames
        ([B, T_window, H, W, 3]: 17 frames for the first window of 5 latents, 16 for each later one).
        Takes the options of `__call__` except `return_timings` and `progress`. The request is checked
        when this is called, before the first frame is asked for. The runner is held from the first frame
        asked for until the generator ends, is closed, or is dropped."""
        plan, draws = self._plan(prompt, options), draws or call_draws(seed, generator, self._torch)

        def chunks() -> Iterator[np.ndarray]:
            with self._lock:
                yield from self._generate(plan, draws, StageTimer(self.backend, False), stop, False, on_step)

        return chunks()

    def describe_build(self) -> str:
        return self.build.describe()

    def _plan(self, prompt, options: dict) -> _Plan:
        """Validate the request and refuse what the graphs cannot serve, naming the build flag that would."""
        request = validate_request(self.config, prompt, **options)
        plan = _Plan(request, mask_schedule(self.geometry.num_tokens, request.num_inference_steps),
                     SamplerTable.from_config(self.configs.scheduler, request.num_diffusion_steps, request.flow_shift))
        self.build.check(request, plan.schedule)
        return plan

    # -- the loops ------------------------------------------------------------------------------------
    # Buffer lifetime: a graph's output stays valid until that graph has run twice more (`Backend`). The
    # loops rely on it where an output feeds the same graph's next call (x -> denoise, canvas -> place or
    # denoise_loop, the KV cache -> temporal_step) and where one is held while other graphs run (the
    # indicator and anchor through a frame, z_selected through a mask step's diffusion steps).
    def _generate(self, plan: _Plan, draws, timer: StageTimer, stop: StopSignal, progress: bool,
                  on_step: Callable[[Progress], None] | None,
                  decode: bool = True) -> Generator[np.ndarray, None, np.ndarray]:
        """Yield decoded pixels as they become decodable (unless not `decode`); -> the latents [B, C, T, h, w]."""
        g, request, upload = self.geometry, plan.request, self.backend.upload
        stop.check()
        loop_latents = request.max_latent_length  # latent frames of the temporal loop (a prefilled one is frame 0)
        loop = diffusion_loop(self.backend, self.build, request.guidance, plan.sampler, request.batch,
                              self._draw_dtype)
        # 1. text: Phi-2 features (+ motion flow) per guidance row; raw_bos of three-block builds
        with timer.stage("text"):
            prefill = self._text_inputs(request)
        rows = {k: upload(v) for k, v in feeds.guidance_rows(request.guidance, g).items()}
        # 2. prefilled frames (image-to-video's image, or given latents): the last is frame 0, all are output
        prefilled = self._prefilled(request, draws, timer)
        latents = prefilled[:-1]  # the output: the prefilled frames, then the generated ones
        decoder = Decoder(self.backend, self.configs.video_vae, len(latents) + loop_latents, request.batch,
                          timer.stage, stop)
        # 3. temporal prefill: frame 0's indicator (the anchor of every later frame) and the KV cache
        position = frame_position(0, loop_latents, g.base_t)
        with timer.stage("temporal"):
            out = self.backend.run("temporal_prefill", {k: upload(v) for k, v in
                                                        {**prefill, "frame_position": position}.items()} | rows)
        indicator = anchor = out["indicator"]
        cache = (out.get("k_cache"), out.get("v_cache"))

        mask_steps = None  # the token order is drawn with the first generated frame, as the reference
        frames = loop_latents - bool(prefilled)
        with tqdm(total=frames * len(plan.schedule), unit="step", desc="mask steps", disable=not progress,
                  leave=False) as bar:
            steps = StepCounter(bar, on_step, frames, len(plan.schedule))
            for t in range(loop_latents):
                # 4. temporal step (t >= 1): the previous latent frame through the KV cache
                if t > 0:
                    indicator, cache = self._temporal_step(t, loop_latents, latents[-1], cache, anchor, rows,
                                                           timer)
                # 5. the frame, set by set (or the last prefilled one)
                if t == 0 and prefilled:
                    latents.append(prefilled[-1])
                else:
                    if mask_steps is None:
                        order = draws.token_order((request.batch, g.num_tokens, 1), self._draw_dtype)[..., 0]
                        mask_steps = self._mask_step_inputs(feeds.pad_rows(order, g.batch), plan.schedule)
                    latents.append(self._frame(loop, mask_steps, indicator, draws, timer, stop, steps))
                # 6. decode what became decodable
                if decode:
                    yield from decoder.ready(latents)
        return np.stack(latents, axis=2)[: request.batch]

    def _text_inputs(self, request: Request) -> dict[str, np.ndarray]:
        """The text rows of every guidance block (`feeds.text_rows`), prompts encoded by the text encoder."""
        g, backend = self.geometry, self.backend
        if request.prompts is None:
            negative = request.negative_prompt_embeds
            return feeds.text_rows(request, [feeds.embed_row(e, g) for e in request.prompt_embeds],
                                   None if negative is None else [feeds.embed_row(e, g) for e in negative], g)
        texts = request.prompts + (request.negative_prompts if request.guided and request.negative_prompts else [])
        ids, lengths = self.tokenizer(texts, g.text_len)
        hidden = backend.download(backend.run("text_encoder", {"input_ids": backend.upload(ids)})["hidden"])
        encoded = [(row, length) for row, length in zip(hidden.astype(np.float32), lengths)]
        count = request.num_prompts
        return feeds.text_rows(request, encoded[:count], encoded[count:] or None, g)

    def _prefilled(self, request: Request, draws, timer: StageTimer) -> list[np.ndarray]:
        """The frames before generation, each [B_built, C, h, w] (host): image-to-video's image latent, or the
        given `latents` (the official pipeline's continuation)."""
        if request.image is not None:
            return [self._encode_image(request.image, draws, timer)]
        if request.latents is not None:
            return [feeds.pad_rows(feeds.to_numpy(frame).astype(np.float32), self.geometry.batch)
                    for frame in request.latents]
        return []

    def _encode_image(self, image: np.ndarray, draws, timer: StageTimer) -> np.ndarray:
        """The image's scaled latent, repeated over the built batch [B_built, C, h, w] (host); the posterior
        sample is the request's first draw."""
        g, backend = self.geometry, self.backend
        noise = feeds.to_numpy(draws.normal((1, g.channels, *g.latent_size), "fp32")).astype(np.float32)
        with timer.stage("vae"):
            encoded = backend.run("vae_encoder", {"image": backend.upload(image[None]),
                                                  "noise": backend.upload(noise)})["latent"]
        return np.repeat(backend.download(encoded), g.batch, axis=0)

    def _temporal_step(self, t: int, loop_latents: int, previous: np.ndarray, cache: tuple, anchor, rows: dict,
                       timer: StageTimer):
        """Frame t >= 1 of the temporal encoder (rows: the uploaded raw_bos, if any). -> (indicator, (k_cache,
        v_cache))."""
        g, upload = self.geometry, self.backend.upload
        inputs = {**rows, "prev_latent": upload(previous),
                  "frame_position": upload(frame_position(t, loop_latents, g.base_t)),
                  "k_cache": cache[0], "v_cache": cache[1],
                  "cache_length": upload(np.array([g.condition_len + t * g.num_video_tokens], np.int64))}
        if g.has_mixer:
            inputs["anchor"] = anchor
        with timer.stage("temporal"):
            out = self.backend.run("temporal_step", inputs)
        return out["indicator"], (out["k_cache_out"], out["v_cache_out"])

    def _mask_step_inputs(self, order: np.ndarray, schedule: list[int]) -> list[tuple[np.ndarray, dict, dict]]:
        """Every mask step's index inputs, uploaded once per request (the token order is fixed). -> per step the
        selected ids on the host (noise rows), the spatial graph's feeds and the placing's."""
        upload, steps = self.backend.upload, []
        for step in feeds.mask_step_indices(order, schedule, self.geometry):
            selected = upload(step.selected)
            steps.append((step.selected, {"known_ids": upload(step.known_ids), "selected": selected,
                                          "known_count": upload(step.known_count)},
                          {"selected": selected, "valid": upload(step.valid)}))
        return steps

    def _frame(self, loop: DiffusionLoop, mask_steps: list, indicator, draws, timer: StageTimer, stop: StopSignal,
               steps: StepCounter) -> np.ndarray:
        """One latent frame, set by set. -> canvas [B_built, C, h, w] float32 (host)."""
        g, backend = self.geometry, self.backend
        canvas = backend.upload(np.zeros((g.batch, g.channels, *g.latent_size), np.float32))
        for selected, spatial, place in mask_steps:
            stop.check()
            drawn = loop.draw(selected, draws)
            with timer.stage("spatial"):
                z = backend.run("spatial", {"canvas": canvas, "indicator": indicator, **spatial})["z_selected"]
            with timer.stage("denoise"):
                canvas = loop.run(canvas, z, drawn, place)
            steps.step()
        return backend.download(canvas).astype(np.float32)


def _drain(generator: Generator, sink) -> object:
    """Run a generator to its end, handing each item to `sink`; -> its return value."""
    while True:
        try:
            sink(next(generator))
        except StopIteration as end:
            return end.value
