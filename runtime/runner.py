"""`NOVARunner`: the frame / set / denoise loops over compiled graphs.

Per request, everything that does not depend on model outputs is prepared first and uploaded once:
token ids, the mask schedule, the random token order and every mask step's index inputs, the sampler
table. Noise is drawn at the start of each mask step, all of the step's draws at once, each for the
whole canvas as the reference draws it (a request's noise up front would hold the canvas once per
diffusion step of every mask step), and only the step's rows are uploaded, in one go, so a backend
whose uploads wait for the device waits once per mask step. Each step then feeds device arrays to a
graph and hands its outputs to the next one:

    text_encoder -> temporal_prefill / temporal_step (KV cache in, KV cache out)    per latent frame
                 -> spatial -> denoise_loop                                        per mask step
                 -> vae_decoder (per sample; per window of 5 latents for the video VAE)

`denoise_loop` is the mask step's whole diffusion loop (S diffusion steps of the head with CFG, the
sampler update, the noise) and the placing of its tokens, unrolled for the build's S
(`BuildProfile.diffusion_steps`): 2 launches per mask step. A request with another num_diffusion_steps
runs the single-step graphs instead, one launch per diffusion step: spatial -> denoise x S -> place.

The loops are identical for every backend (torch, onnxruntime, tensorrt), so they are tested on CPU.
With the same seed the random draws equal the reference pipeline's (torch.Generator; the draws
follow the official order), so runner and reference agree to rounding. Over an engine folder with
the tensorrt or onnxruntime backend the runner needs neither torch nor the other backend's library.
Where torch is installed it is still used for the draws (torch.Generator, the reference's numbers)
and the sampler table (torch's float32 sqrt and linspace, as diffusers computes them); without it,
seeds draw from numpy instead (`runtime.draws.NumpyDraws`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import numbers
import re
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Generator, Iterator, Sequence

import numpy as np
import PIL.Image

from runtime.backends.base import Backend
from runtime.configs import CheckpointConfigs, CheckpointError
from runtime.draws import NumpyDraws, RandomDraws
from runtime.engine_folder import EngineFolder, ManifestError
from runtime.graphs.profile import NO_CLIP, VIDEO_VAE_WINDOW, BuildProfile, Geometry, frame_position
from runtime.request import Request, validate_request
from runtime.schedules import SamplerTable, mask_schedule

STAGES = ("text", "temporal", "spatial", "denoise", "vae")
# served by builds with the third guidance pass (`BuildProfile.third_pass`); other builds refuse them naming the flag
THIRD_PASS_OPTIONS = ("image_guidance_scale", "spatiotemporal_guidance_scale")


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
    unrolled: bool  # denoise_loop runs the request's diffusion steps (else denoise per step, then place)


@dataclasses.dataclass
class _MaskStep:
    """One mask step's index inputs: `selected` on the host (noise rows), the graphs' feeds on the device."""

    selected: np.ndarray  # [B_built, n_max] token ids
    spatial: dict  # known_ids, known_count, selected
    place: dict  # selected, valid


class _Timer:
    def __init__(self, backend: Backend, enabled: bool):
        self.backend, self.enabled, self.seconds = backend, enabled, defaultdict(float)

    @contextlib.contextmanager
    def stage(self, name: str):
        if not self.enabled:
            yield
            return
        start = time.perf_counter()
        yield
        self.backend.synchronize()
        self.seconds[name] += time.perf_counter() - start


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
        self.tokenizer = PromptTokenizer.from_folder(configs.tokenizer)
        self._draw_dtype = self.graphs["denoise"]["precision"]  # draws in the head's dtype, as the reference
        self._lock = threading.Lock()
        missing = [name for name in self.graphs if name not in backend.graphs]
        if missing:
            raise ValueError(f"the {backend.name} backend lacks graphs: {', '.join(missing)}")

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, folder: str | Path, profile: BuildProfile | None = None, precision: str = "fp32",
                        device: str = "cpu") -> "NOVARunner":
        """The torch backend straight from a checkpoint folder (no export): the graphs' own modules."""
        from runtime.backends import BackendUnavailable

        _check_device(device)
        configs, profile = CheckpointConfigs.read(folder), profile or BuildProfile()
        try:
            backend = _torch_backend(configs, profile, precision, None, "onnxruntime", device)
        except BackendUnavailable as error:
            raise ValueError(str(error)) from None
        return cls(backend, configs, profile, {name: spec.describe() for name, spec in backend.specs.items()})

    @classmethod
    def from_engines(cls, folder: str | Path, backend: str = "auto", device: str | None = None) -> "NOVARunner":
        """Load an engine folder built by `export/build_engines.py`.

        backend: "auto" (TensorRT if the folder has engines, TensorRT is importable and the device is not
        "cpu"; else ONNX Runtime), "tensorrt", "onnxruntime", or "torch" (the graphs' PyTorch modules,
        weights from the checkpoint the folder was built from). device: "cpu", "cuda" or "cuda:N"; by
        default "cuda" for TensorRT and "cpu" for the others. Every artifact is checked against the
        manifest (size and sha256) before use; a missing, partial, edited or mismatched folder is refused
        with a message that says what to rebuild. The folder is self-contained for tensorrt and
        onnxruntime: configs and tokenizer are read from its configs/ copy, and neither torch nor the
        checkpoint is needed.
        """
        from runtime.backends import BACKENDS, BackendUnavailable

        if backend not in ("auto", *BACKENDS):
            raise ValueError(f"backend must be one of auto, {', '.join(BACKENDS)}; got {backend!r}")
        if device is not None:
            _check_device(device)
        if backend == "auto":
            on_gpu = device is None or device.startswith("cuda")
            backend = "tensorrt" if on_gpu and any(Path(folder).glob("*.plan")) and _tensorrt_importable() \
                else "onnxruntime"
        device = device or ("cuda" if backend == "tensorrt" else "cpu")
        try:
            engines = EngineFolder.open(folder, engines=backend == "tensorrt")
            configs = CheckpointConfigs.read(engines.configs_path)
        except (ManifestError, CheckpointError) as error:
            raise ValueError(str(error)) from None
        manifest, profile = engines.manifest, BuildProfile(**engines.manifest["profile"])
        try:
            if backend == "torch":
                engine = _torch_backend(_built_checkpoint(manifest), profile, manifest["precision"],
                                        manifest["overrides"] or None, manifest["backend"], device)
            elif backend == "onnxruntime":
                from runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

                engine = OnnxRuntimeBackend({name: engines.onnx_path(name) for name in engines.graphs}, device,
                                            tf32=manifest["precision"] != "fp32")
            else:
                from runtime.backends.tensorrt_backend import TensorRTBackend

                engine = TensorRTBackend({name: engines.plan_path(name) for name in engines.graphs}, device)
        except BackendUnavailable as error:
            raise ValueError(str(error)) from None
        return cls(engine, configs, profile, {name: engines.declaration(name) for name in engines.graphs})

    # -- public API -----------------------------------------------------------------------------------
    def __call__(self, prompt: str | Sequence[str] | None = None, *, seed: int | None = None, generator=None,
                 draws: RandomDraws | NumpyDraws | None = None, output_type: str = "np", return_timings: bool = False,
                 progress: bool = False, disable_progress_bar: bool | None = None, **options) -> RunnerOutput:
        """Generate. options: those of the official pipeline with its defaults (`runtime.request.validate_request`,
        the README's table): negative_prompt, num_inference_steps, num_diffusion_steps, guidance_scale,
        guidance_trunc, flow_shift, max_latent_length, motion_flow, image, latents, num_images_per_prompt,
        prompt_embeds, negative_prompt_embeds, and image_guidance_scale or spatiotemporal_guidance_scale on a
        build with the third guidance pass, guidance_renorm on a build with the whole-grid loop (--guidance-renorm).
        seed or generator (a torch.Generator) or draws: the random numbers. output_type: "np" (uint8 arrays, what a
        service needs), "pil" (images as PIL images; a video's frames stay arrays, as officially) or "latent"
        (latents only, nothing decoded). return_timings: seconds per stage in the output; progress (or the
        official disable_progress_bar=False): a progress bar over the mask steps (on stderr)."""
        if output_type not in ("np", "pil", "latent"):
            raise ValueError(f"output_type must be 'np', 'pil' or 'latent', got {output_type!r} (the compiled VAE "
                             f"graphs emit uint8 pixels: for 'pt' use runtime.reference.ReferencePipeline)")
        plan, draws = self._plan(prompt, options), draws or _draws(seed, generator)
        progress = progress if disable_progress_bar is None else not disable_progress_bar
        timer, chunks = _Timer(self.backend, return_timings), []
        with self._lock:
            latents = _drain(self._generate(plan, draws, timer, progress, output_type != "latent"), chunks.append)
        timings = dict(timer.seconds) if return_timings else None
        if output_type == "latent":
            return RunnerOutput(latents=latents, timings=timings)
        decoded = np.concatenate(chunks, axis=1 if chunks[0].ndim == 5 else 0)
        if decoded.ndim == 5:
            return RunnerOutput(latents=latents, frames=decoded, timings=timings)
        return RunnerOutput(latents=latents, timings=timings, images=decoded if output_type == "np" else
                            [PIL.Image.fromarray(image) for image in decoded])

    def stream(self, prompt: str | Sequence[str] | None = None, *, seed: int | None = None, generator=None,
               draws: RandomDraws | NumpyDraws | None = None, **options) -> Iterator[np.ndarray]:
        """Yield decoded pixels as soon as they exist: the images, or each window of video frames
        ([B, T_window, H, W, 3]: 17 frames for the first window of 5 latents, 16 for each later one).
        Takes the options of `__call__` except `return_timings` and `progress`. The request is checked
        when this is called, before the first frame is asked for."""
        plan, draws = self._plan(prompt, options), draws or _draws(seed, generator)

        def frames() -> Iterator[np.ndarray]:
            with self._lock:
                yield from self._generate(plan, draws, _Timer(self.backend, False), False)

        return frames()

    def describe_build(self) -> str:
        g = self.geometry
        loop = f", {self.profile.diffusion_steps} diffusion steps per launch" if "denoise_loop" in self.graphs else ""
        return (f"{g.batch} image(s) per call ({self.profile.prompts} prompt(s) x {self.profile.images_per_prompt}), "
                f"CFG {'on' if g.cfg else 'off'}, up to {g.max_latent_length} latent frame(s), "
                f"up to {g.max_tokens_per_step} tokens per mask step{loop}"
                f"{', a third guidance pass (image/spatiotemporal guidance)' if g.blocks == 3 else ''}")

    # -- request checks -----------------------------------------------------------------------------
    def _plan(self, prompt, options: dict) -> _Plan:
        """Validate the request and refuse what the graphs cannot serve, naming what they were built for."""
        request = validate_request(self.config, prompt, **options)
        plan = _Plan(request, mask_schedule(self.geometry.num_tokens, request.num_inference_steps),
                     SamplerTable.from_config(self.configs.scheduler, request.num_diffusion_steps, request.flow_shift),
                     "denoise_loop" in self.graphs and request.num_diffusion_steps == self.profile.diffusion_steps)
        g, built = self.geometry, f"these engines were built for {self.describe_build()}"
        if request.batch > g.batch:
            raise ValueError(f"{request.num_prompts} prompt(s) x {request.num_images_per_prompt} image(s) = "
                             f"{request.batch} images per call; {built}")
        if request.guided and not g.cfg:  # a CFG build serves unguided requests too: its graphs then take the cond rows
            raise ValueError(f"guidance_scale {request.guidance_scale:g} needs classifier-free guidance; {built} "
                             f"(rebuild without --no-cfg)")
        third = [name for name in request.extra_options if name in THIRD_PASS_OPTIONS]
        if third and g.blocks < 3:
            raise ValueError(f"{third[0]} needs a third guidance pass; {built} (rebuild with --third-guidance-pass)")
        if "guidance_renorm" in request.extra_options and not (self.profile.guidance_renorm and plan.unrolled):
            raise ValueError(f"guidance_renorm runs in a diffusion loop over the whole token grid; {built} (rebuild "
                             + ("with --guidance-renorm)" if not self.profile.guidance_renorm else
                                f"with --diffusion-steps {request.num_diffusion_steps} for this step count)"))
        if request.max_latent_length > g.max_latent_length:
            raise ValueError(f"max_latent_length {request.max_latent_length} exceeds the KV cache; {built}")
        if request.latents is not None and len(request.latents) > 1 and not self.configs.video_vae:
            raise ValueError(f"{len(request.latents)} latent frames given; an image VAE decodes one")
        if request.image is not None and "vae_encoder" not in self.graphs:
            raise ValueError(f"image-to-video needs the VAE encoder graph, which was not built; {built}")
        if max(plan.schedule) > g.max_tokens_per_step:
            raise ValueError(f"num_inference_steps {request.num_inference_steps} predicts up to {max(plan.schedule)} "
                             f"tokens in one step; {built}, i.e. num_inference_steps >= {self.profile.min_mask_steps} "
                             f"(rebuild with --min-mask-steps {request.num_inference_steps} for fewer)")
        if request.prompts is not None:
            rows = request.num_prompts * (2 if request.guided and request.negative_prompts else 1)
            if rows > g.text_batch:
                raise ValueError(f"{rows} prompts to encode in one call; {built}")
        return plan

    # -- the loops ------------------------------------------------------------------------------------
    # Buffer lifetime: a graph's output stays valid until that graph has run twice more (`Backend`). The
    # loops rely on it where an output feeds the same graph's next call (x -> denoise, canvas -> place or
    # denoise_loop, the KV cache -> temporal_step) and where one is held while other graphs run (the
    # indicator and anchor through a frame, z_selected through a mask step's diffusion steps).
    def _generate(self, plan: _Plan, draws, timer: _Timer, progress: bool,
                  decode: bool = True) -> Generator[np.ndarray, None, np.ndarray]:
        """Yield decoded pixels as they become decodable (unless not `decode`); -> the latents [B, C, T, h, w]."""
        from tqdm.auto import tqdm

        g, request, run, upload = self.geometry, plan.request, self.backend.run, self.backend.upload
        frames = request.max_latent_length
        feeds = self._sampler_feeds(plan)

        # 1. text: Phi-2 features (+ motion flow) per CFG row
        with timer.stage("text"):
            prefill = self._text_inputs(request)
        rows = {k: upload(v) for k, v in _guidance_rows(request, g).items()}  # raw_bos of three-block builds
        # 2. prefilled frames (image-to-video's image, or given latents): the last is frame 0, all are output
        prefilled = self._prefilled(request, draws, timer)
        # 3. temporal prefill: frame 0's indicator (the anchor of every later frame) and the KV cache
        with timer.stage("temporal"):
            out = run("temporal_prefill", {k: upload(v) for k, v in
                                           {**prefill, "frame_position": frame_position(0, frames, g.base_t)}.items()}
                   | rows)
        indicator = anchor = out["indicator"]
        cache = (out.get("k_cache"), out.get("v_cache"))

        latents = prefilled[:-1]  # the output: the prefilled frames, then the generated ones
        total = len(latents) + frames
        mask_steps, decoded = None, 0  # the token order is drawn with the first generated frame, as the reference
        with tqdm(total=(frames - bool(prefilled)) * len(plan.schedule), unit="step", desc="mask steps",
                  disable=not progress, leave=False) as bar:
            for t in range(frames):
                # 4. temporal step (t >= 1): the previous latent frame through the KV cache
                if t > 0:
                    indicator, cache = self._temporal_step(t, frames, latents[-1], cache, anchor, rows, timer)
                # 5. the frame, set by set (or the last prefilled one)
                if t == 0 and prefilled:
                    latents.append(prefilled[-1])
                else:
                    if mask_steps is None:
                        order = draws.token_order((request.batch, g.num_tokens, 1), self._draw_dtype)[..., 0]
                        mask_steps = self._mask_step_inputs(_pad_rows(order, g.batch), plan.schedule)
                    latents.append(self._frame(plan, feeds, mask_steps, indicator, draws, timer, bar))
                # 6. decode what became decodable
                if decode:
                    yield from self._decode_ready(latents, total, decoded, request.batch, timer)
                decoded = self._decoded_count(len(latents), total)
        return np.stack(latents, axis=2)[: request.batch]

    def _prefilled(self, request: Request, draws, timer: _Timer) -> list[np.ndarray]:
        """The frames before generation, each [B_built, C, h, w] (host): image-to-video's image latent, or the
        given `latents` (the official pipeline's continuation)."""
        if request.image is not None:
            return [self._encode_image(request.image, draws, timer)]
        if request.latents is not None:
            return [_pad_rows(_numpy(frame).astype(np.float32), self.geometry.batch) for frame in request.latents]
        return []

    def _encode_image(self, image: np.ndarray, draws, timer: _Timer) -> np.ndarray:
        """The image's scaled latent, repeated over the built batch [B_built, C, h, w] (host); the posterior
        sample is the request's first draw."""
        g, backend = self.geometry, self.backend
        noise = _numpy(draws.normal((1, g.channels, *g.latent_size), "fp32")).astype(np.float32)
        with timer.stage("vae"):
            encoded = backend.run("vae_encoder", {"image": backend.upload(image[None]),
                                                  "noise": backend.upload(noise)})["latent"]
        return np.repeat(backend.download(encoded), g.batch, axis=0)

    def _temporal_step(self, t: int, frames: int, previous: np.ndarray, cache: tuple, anchor, rows: dict,
                       timer: _Timer):
        """Frame t >= 1 of the temporal encoder (rows: the uploaded `_guidance_rows`). -> (indicator, (k_cache,
        v_cache))."""
        g, upload = self.geometry, self.backend.upload
        inputs = {**rows, "prev_latent": upload(previous),
                  "frame_position": upload(frame_position(t, frames, g.base_t)),
                  "k_cache": cache[0], "v_cache": cache[1],
                  "cache_length": upload(np.array([g.condition_len + t * g.num_video_tokens], np.int64))}
        if g.has_mixer:
            inputs["anchor"] = anchor
        with timer.stage("temporal"):
            out = self.backend.run("temporal_step", inputs)
        return out["indicator"], (out["k_cache_out"], out["v_cache_out"])

    def _mask_step_inputs(self, order: np.ndarray, schedule: list[int]) -> list[_MaskStep]:
        """The index inputs of every mask step, uploaded once per request (the token order is fixed)."""
        g, upload = self.geometry, self.backend.upload
        steps, position = [], 0
        for count in schedule:
            # Distinct ids per row: this step's tokens, then the next ones of the order (marked invalid).
            selected = np.take(order, (position + np.arange(g.max_tokens_per_step)) % g.num_tokens, axis=1)
            valid = np.broadcast_to(np.arange(g.max_tokens_per_step) < count, selected.shape)
            on_device = upload(selected)
            steps.append(_MaskStep(selected, spatial={
                "known_ids": upload(np.ascontiguousarray(order[:, :g.known_slots(position)])),
                "known_count": upload(np.array([position], np.int64)), "selected": on_device},
                place={"selected": on_device, "valid": upload(np.ascontiguousarray(valid))}))
            position += count
        return steps

    def _sampler_feeds(self, plan: _Plan) -> list[dict]:
        """The sampler inputs of each diffusion launch of a mask step, uploaded once per request: one feed of
        the whole table for denoise_loop, else one per diffusion step for denoise. `noise` is zeros here and
        replaced by the mask step's draws where the sampler adds noise (DDPM at t > 0)."""
        g, upload, sampler = self.geometry, self.backend.upload, plan.sampler
        rows = (g.batch, g.num_tokens if self._whole_grid(plan) else g.max_tokens_per_step, g.token_dim)
        clip = upload(np.array([sampler.clip_range if sampler.clip_range is not None else NO_CLIP], np.float32))
        guidance = _step_guidance(plan.request, sampler)
        third = {k: upload(v) for k, v in _third_pass_feeds(plan.request, g).items()}
        if self._whole_grid(plan):
            third["renorm"] = upload(np.array([plan.request.guidance_renorm], np.float32))
        if plan.unrolled:
            return [{**third, "clip_range": clip, "guidance_scale": upload(guidance),
                     "timesteps": upload(sampler.timesteps),
                     "coefficients": upload(sampler.coefficients),
                     "noise": upload(np.zeros((len(sampler.timesteps), *rows), np.float32))}]
        no_noise = upload(np.zeros(rows, np.float32))
        scales = {value: upload(np.array([value], np.float32)) for value in set(guidance.tolist())}  # one per value
        return [{**third, "clip_range": clip, "guidance_scale": scales[guidance[j].item()],
                 "timestep": upload(sampler.timesteps[j:j + 1]), "coefficients": upload(sampler.coefficients[j]),
                 "noise": no_noise} for j in range(len(sampler.timesteps))]

    def _whole_grid(self, plan: _Plan) -> bool:
        """Whether the mask step's diffusion loop runs over every token (a --guidance-renorm build's denoise_loop)."""
        return plan.unrolled and self.profile.guidance_renorm

    def _step_noise(self, plan: _Plan, selected: np.ndarray, draws) -> tuple[object, list[dict]]:
        """A mask step's draws in the reference's order (the initial noise, then each noise-adding diffusion
        step's), each for the whole canvas as the reference draws it; only the step's rows go up, all before
        the step's launches (an upload waits for the device, so it is done once per step).
        -> x on the device, and per diffusion launch (`_sampler_feeds`) its noise feed ({}: the zeros stay)."""
        g, upload, sampler = self.geometry, self.backend.upload, plan.sampler
        shape, dtype = (plan.request.batch, g.channels, *g.latent_size), self._draw_dtype
        rows = (lambda noise: _grid_rows(noise, g)) if self._whole_grid(plan) else \
            (lambda noise: _gather_rows(noise, selected, g))
        x = upload(rows(draws.normal(shape, dtype)))
        steps = range(len(sampler.timesteps))
        noise = {j: rows(draws.normal(shape, dtype)) for j in steps if sampler.draws_noise(j)}
        if not plan.unrolled:
            return x, [{"noise": upload(noise[j])} if j in noise else {} for j in steps]
        if not noise:
            return x, [{}]
        zeros = np.zeros_like(next(iter(noise.values())))
        return x, [{"noise": upload(np.stack([noise.get(j, zeros) for j in steps]))}]  # all steps' in one upload

    def _frame(self, plan: _Plan, feeds: list[dict], mask_steps: list[_MaskStep], indicator, draws, timer: _Timer,
               bar) -> np.ndarray:
        """One latent frame, set by set. -> canvas [B_built, C, h, w] float32 (host)."""
        g, backend, run = self.geometry, self.backend, self.backend.run
        canvas = backend.upload(np.zeros((g.batch, g.channels, *g.latent_size), np.float32))
        for step in mask_steps:
            x, noise = self._step_noise(plan, step.selected, draws)
            with timer.stage("spatial"):
                z = run("spatial", {"canvas": canvas, "indicator": indicator, **step.spatial})["z_selected"]
            with timer.stage("denoise"):
                if plan.unrolled:  # one launch: every diffusion step, then the placing
                    canvas = run("denoise_loop", {**feeds[0], **noise[0], "canvas": canvas, "x": x, "z_selected": z,
                                                  **step.place})["canvas_out"]
                else:  # one launch per diffusion step, then one to place
                    for inputs, step_noise in zip(feeds, noise):
                        x = run("denoise", {**inputs, **step_noise, "x": x, "z_selected": z})["x_next"]
                    canvas = run("place", {"canvas": canvas, "x": x, **step.place})["canvas_out"]
            bar.update(1)
        return backend.download(canvas).astype(np.float32)

    # -- decoding -----------------------------------------------------------------------------------------
    def _decoded_count(self, available: int, frames: int) -> int:
        """Latents whose pixels have been produced once `available` latents exist."""
        window = min(VIDEO_VAE_WINDOW, frames)
        if not self.configs.video_vae or window == 1:
            return available
        if available < window:
            return 0
        return window + ((available - window) // (window - 1)) * (window - 1)

    def _decode_ready(self, latents: list, frames: int, done: int, batch: int, timer: _Timer) -> Iterator[np.ndarray]:
        """Decode what became decodable since `done` latents were: an image VAE decodes each frame; the video VAE
        decodes all latents at once up to 5, else windows of 5 with stride 4 (the official tiling),
        dropping the first output frame of later windows and latents that fill no window."""
        ready = self._decoded_count(len(latents), frames)
        if ready == done:
            return
        backend, run = self.backend, self.backend.run
        if not self.configs.video_vae:
            with timer.stage("vae"):
                images = [backend.download(run("vae_decoder", {"latents": backend.upload(latents[-1][i:i + 1])})["pixels"])
                          for i in range(batch)]
            yield np.concatenate(images)
            return
        window = min(VIDEO_VAE_WINDOW, frames)
        graph = "vae_decoder_single" if window == 1 else "vae_decoder"
        start = 0 if done == 0 else done - 1
        stacked = np.stack(latents, axis=2)
        while start + window <= ready:
            with timer.stage("vae"):
                pixels = np.concatenate([backend.download(run(graph, {
                    "latents": backend.upload(np.ascontiguousarray(stacked[i:i + 1, :, start:start + window]))})["pixels"])
                    for i in range(batch)])
            yield pixels if start == 0 else pixels[:, 1:]
            start += max(1, window - 1)

    # -- text ---------------------------------------------------------------------------------------------
    def _text_inputs(self, request: Request) -> dict[str, np.ndarray]:
        """text_hidden [M, 256, Dt], text_lengths [M] (+ motion_flow [M]): conditional rows (prompt-major,
        repeated per image, padded to the built batch), then the unconditional rows, then (three-block builds)
        the third block's: the unconditional rows for image guidance, else the conditional ones
        (`Guidance.text_rows`; plain CFG combines them with a third scale of 0)."""
        g = self.geometry
        if request.prompts is not None:
            texts = request.prompts + (request.negative_prompts if request.guided and request.negative_prompts else [])
            ids, lengths = self.tokenizer(texts, g.text_len)
            hidden = self.backend.download(self.backend.run(
                "text_encoder", {"input_ids": self.backend.upload(ids)})["hidden"]).astype(np.float32)
            positive = [(hidden[i], lengths[i]) for i in range(request.num_prompts)]
            negative = [(hidden[request.num_prompts + i], lengths[request.num_prompts + i])
                        for i in range(request.num_prompts)] if len(texts) > request.num_prompts else None
        else:
            positive = [_embed_row(e, g) for e in request.prompt_embeds]
            negative = [_embed_row(e, g) for e in request.negative_prompt_embeds] \
                if request.negative_prompt_embeds is not None else None
        empty = (np.zeros((g.text_len, g.text_dim), np.float32), 0)
        rows = _pad_rows([r for r in positive for _ in range(request.num_images_per_prompt)], g.batch)
        if g.cfg:
            uncond = negative or [empty] * request.num_prompts
            cond = rows
            rows = cond + _pad_rows([r for r in uncond for _ in range(request.num_images_per_prompt)], g.batch)
            if g.blocks == 3:
                rows += rows[g.batch:] if request.image_guidance_scale else cond
        out = {"text_hidden": np.stack([r[0] for r in rows]), "text_lengths": np.array([r[1] for r in rows], np.int64)}
        if g.has_motion:
            out["motion_flow"] = np.full((g.model_batch,), request.motion_flow, np.float32)
        return out


def _guidance_rows(request: Request, g: Geometry) -> dict[str, np.ndarray]:
    """The temporal graphs' raw_bos [M] of a three-block build: block 1 under image guidance (its unconditional
    pass sees the raw BOS token at every frame, as `Guidance.stack`)."""
    if g.blocks < 3:
        return {}
    return {"raw_bos": (np.arange(g.model_batch) // g.batch == 1) & bool(request.image_guidance_scale)}


def _third_pass_feeds(request: Request, g: Geometry) -> dict[str, np.ndarray]:
    """The diffusion graphs' third_scale [1] and image_guidance [1] of a three-block build (a scale of 0 with the
    spatiotemporal form is plain CFG, exactly)."""
    if g.blocks < 3:
        return {}
    scale = request.image_guidance_scale or request.spatiotemporal_guidance_scale
    return {"third_scale": np.array([scale], np.float32),
            "image_guidance": np.array([request.image_guidance_scale > 0])}


def _step_guidance(request: Request, sampler: SamplerTable) -> np.ndarray:
    """The guidance scale of each diffusion step [S] float32: the request's, and 1 (off: the graphs take the
    conditional output) where the request is unguided or guidance_trunc turned it off; the official code turns
    it off from the first timestep below guidance_trunc to the end of the mask step (timesteps decrease)."""
    on = request.guided & ~np.logical_or.accumulate(sampler.timesteps < np.float32(request.guidance_trunc))
    return np.where(on, np.float32(request.guidance_scale), np.float32(1)).astype(np.float32)


def _drain(generator: Generator, sink) -> object:
    """Run a generator to its end, handing each item to `sink`; -> its return value."""
    while True:
        try:
            sink(next(generator))
        except StopIteration as end:
            return end.value


def _tensorrt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def _embed_row(embeds, g: Geometry) -> tuple[np.ndarray, int]:
    values = np.asarray(embeds.float().cpu() if hasattr(embeds, "cpu") else embeds, np.float32)[: g.text_len]
    row = np.zeros((g.text_len, g.text_dim), np.float32)
    row[: len(values)] = values
    return row, len(values)


def _pad_rows(rows, count: int):
    """Fill a batch built for `count` rows by repeating the last row (padded rows are discarded)."""
    if isinstance(rows, np.ndarray):
        return np.concatenate([rows, np.repeat(rows[-1:], count - len(rows), axis=0)]) if len(rows) < count else rows
    return list(rows) + [rows[-1]] * (count - len(rows))


def _patchify(x: np.ndarray, patch: int) -> np.ndarray:
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.transpose(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def _grid_rows(noise, g: Geometry) -> np.ndarray:
    """Noise drawn for the whole canvas [B, C, h, w] -> every token's values [B_built, N, 16]."""
    return _pad_rows(_patchify(_numpy(noise).astype(np.float32), g.patch), g.batch)


def _gather_rows(noise, selected: np.ndarray, g: Geometry) -> np.ndarray:
    """Noise drawn for the whole canvas [B, C, h, w] -> the selected tokens' values [B_built, n_max, 16]."""
    return np.take_along_axis(_grid_rows(noise, g), selected[..., None], axis=1)


def _numpy(value) -> np.ndarray:
    return value.float().cpu().numpy() if hasattr(value, "cpu") and str(value.dtype) == "torch.bfloat16" else \
        (value.cpu().numpy() if hasattr(value, "cpu") else np.asarray(value))


def _built_checkpoint(manifest: dict) -> CheckpointConfigs:
    """The checkpoint an engine folder was built from (the torch backend reads its weights)."""
    source = Path(manifest["checkpoint"]["path"])
    if not (source / "model_index.json").is_file():
        raise ValueError(f"the torch backend reads weights from the checkpoint the engines were built from, {source}, "
                         f"which is not there (the tensorrt and onnxruntime backends do not need it)")
    return CheckpointConfigs.read(source)


def _torch_backend(configs: CheckpointConfigs, profile: BuildProfile, precision: str, overrides: dict | None,
                   built_for: str, device: str) -> Backend:
    """The graphs' torch modules with the checkpoint's weights."""
    from runtime.backends.torch_backend import TorchBackend
    from runtime.graphs.specs import build_specs

    return TorchBackend(build_specs(configs, profile, precision, overrides, built_for), device)


def _check_device(device) -> None:
    if not isinstance(device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def _draws(seed: int | None, generator):
    """torch.Generator draws (the reference's numbers) when torch is installed, else numpy's."""
    if generator is not None:
        if seed is not None:
            raise ValueError("give at most one of seed and generator")
        return RandomDraws(generator)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                             or not 0 <= seed < 2 ** 64):
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    try:
        import torch
    except ImportError:
        return NumpyDraws(seed)
    return RandomDraws(None if seed is None else torch.Generator().manual_seed(int(seed)))
