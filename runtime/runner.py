"""`NOVARunner`: the frame / set / denoise loops over compiled graphs.

Per request, everything that does not depend on model outputs is prepared on the host first (token
ids, the mask schedule, the random token order, the padded index tables, the sampler table, noise);
each step then only feeds arrays to a graph and hands its outputs to the next one:

    text_encoder -> temporal_prefill / temporal_step (KV cache in, KV cache out)    per latent frame
                 -> spatial -> denoise x S -> place                                per mask step
                 -> vae_decoder (per sample; per window of 5 latents for the video VAE)

The loops are identical for every backend (torch, onnxruntime, tensorrt), so they are tested on CPU.
With the same seed the random draws equal the reference pipeline's (torch.Generator; the draws
follow the official order), so runner and reference agree to rounding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from runtime.draws import RandomDraws
from runtime.graphs.profile import BuildProfile, Geometry
from runtime.graphs.specs import NO_CLIP, VIDEO_VAE_WINDOW, Checkpoint, GraphSpec, build_specs, frame_position
from runtime.request import Request, validate_request

STAGES = ("text", "temporal", "spatial", "denoise", "vae")
_OPTION_DEFAULTS = dict(negative_prompt=None, num_inference_steps=64, num_diffusion_steps=25, guidance_scale=5.0,
                        max_latent_length=1, motion_flow=5, image=None, num_images_per_prompt=1, prompt_embeds=None,
                        negative_prompt_embeds=None)


@dataclasses.dataclass
class RunnerOutput:
    latents: np.ndarray  # [B, C, T, h, w] float32 scaled latents
    images: np.ndarray | None = None  # [B, H, W, 3] uint8 (image VAE)
    frames: np.ndarray | None = None  # [B, T', H, W, 3] uint8 (video VAE)
    timings: dict[str, float] | None = None  # seconds per stage, on request


def _patchify(x: np.ndarray, patch: int) -> np.ndarray:
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.transpose(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


class _Timer:
    def __init__(self, backend, enabled: bool):
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

    def __init__(self, backend, checkpoint: Checkpoint, specs: dict[str, GraphSpec], profile: BuildProfile):
        self.backend, self.checkpoint, self.specs, self.profile = backend, checkpoint, specs, profile
        self.config = checkpoint.config
        self.geometry = Geometry.from_config(self.config, profile)
        from runtime.model.text_encoder import load_tokenizer

        self.tokenizer = load_tokenizer(checkpoint.folder / "tokenizer")
        self._lock = threading.Lock()
        missing = [name for name in specs if name not in backend.graphs]
        if missing:
            raise ValueError(f"the {backend.name} backend lacks graphs: {', '.join(missing)}")

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, folder: str | Path, profile: BuildProfile | None = None, precision: str = "fp32",
                        device: str = "cpu") -> "NOVARunner":
        """The torch backend straight from a checkpoint folder (no export): the graphs' own modules."""
        from runtime.backends.torch_backend import TorchBackend

        checkpoint, profile = Checkpoint(folder), profile or BuildProfile()
        specs = build_specs(checkpoint, profile, precision)
        return cls(TorchBackend(specs, device), checkpoint, specs, profile)

    @classmethod
    def from_engines(cls, folder: str | Path, backend: str = "auto", device: str = "cpu") -> "NOVARunner":
        """Load an engine folder built by `export/build_engines.py`.

        backend: "auto" (TensorRT if the folder has engines and TensorRT is importable, else ONNX Runtime),
        "tensorrt", "onnxruntime", or "torch" (the graphs' PyTorch modules, weights from the checkpoint).
        Every artifact is checked against the manifest (size and sha256) before use; a missing, partial,
        edited or mismatched folder is refused with a message that says what to rebuild.
        """
        from export.manifest import ManifestError, verify_folder
        from runtime.backends import BACKENDS, BackendUnavailable

        folder = Path(folder)
        if backend not in ("auto", *BACKENDS):
            raise ValueError(f"backend must be one of auto, {', '.join(BACKENDS)}; got {backend!r}")
        if backend == "auto":
            backend = "tensorrt" if _has_engines(folder) and _tensorrt_importable() else "onnxruntime"
        try:
            manifest = verify_folder(folder, "tensorrt" if backend == "tensorrt" else None)
        except ManifestError as error:
            raise ValueError(str(error)) from None
        source = Path(manifest["checkpoint"]["path"])
        if not (source / "model_index.json").is_file():
            raise ValueError(f"{folder} was built from the checkpoint {source}, which is not there; the runner reads its "
                             f"configs, scheduler and tokenizer")
        checkpoint = Checkpoint(source)
        profile = BuildProfile(**manifest["profile"])
        specs = build_specs(checkpoint, profile, manifest["precision"], manifest.get("overrides") or None,
                            manifest["backend"])
        if Geometry.from_config(checkpoint.config, profile).to_dict() != manifest["geometry"]:
            raise ValueError(f"{folder} no longer matches its checkpoint {source} (the configs changed since the build); "
                             f"rebuild with export/build_engines.py")
        missing = [name for name in specs if name not in manifest["components"]]
        if missing:
            raise ValueError(f"{folder} is a partial build: no {', '.join(missing)}; rebuild with export/build_engines.py")
        try:
            if backend == "torch":
                from runtime.backends.torch_backend import TorchBackend

                engine = TorchBackend(specs, device)
            elif backend == "onnxruntime":
                from runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

                engine = OnnxRuntimeBackend({name: folder / _onnx_file(manifest["components"][name]) for name in specs},
                                            device)
            else:
                from runtime.backends.tensorrt_backend import TensorRTBackend

                engine = TensorRTBackend({name: folder / _engine_file(manifest["components"][name]) for name in specs},
                                         device)
        except BackendUnavailable as error:
            raise ValueError(str(error)) from None
        return cls(engine, checkpoint, specs, profile)

    # -- public API -----------------------------------------------------------------------------------
    def __call__(self, prompt: str | Sequence[str] | None = None, *, negative_prompt=None,
                 num_inference_steps: int = 64, num_diffusion_steps: int = 25, guidance_scale: float = 5.0,
                 max_latent_length: int = 1, motion_flow: float = 5, image: np.ndarray | None = None,
                 num_images_per_prompt: int = 1, seed: int | None = None, generator=None,
                 draws: RandomDraws | None = None, prompt_embeds=None, negative_prompt_embeds=None,
                 return_timings: bool = False) -> RunnerOutput:
        """Generate; the options and defaults are the official pipeline's (see README)."""
        options = dict(prompt=prompt, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
                       num_diffusion_steps=num_diffusion_steps, guidance_scale=guidance_scale,
                       max_latent_length=max_latent_length, motion_flow=motion_flow, image=image,
                       num_images_per_prompt=num_images_per_prompt, prompt_embeds=prompt_embeds,
                       negative_prompt_embeds=negative_prompt_embeds)
        result: dict = {}
        chunks = list(self._generate(options, seed, generator, draws, return_timings, result))
        decoded = np.concatenate(chunks, axis=1 if chunks[0].ndim == 5 else 0)
        kind = "frames" if decoded.ndim == 5 else "images"
        return RunnerOutput(latents=result["latents"], timings=result.get("timings"), **{kind: decoded})

    def stream(self, prompt: str | Sequence[str] | None = None, *, seed: int | None = None, generator=None,
               draws: RandomDraws | None = None, **options) -> Iterator[np.ndarray]:
        """Yield decoded pixels as soon as they exist: the images, or each window of video frames
        ([B, T_window, H, W, 3]: 17 frames for the first window of 5 latents, 16 for each later one).
        Takes the options of `__call__`."""
        unknown = sorted(set(options) - set(_OPTION_DEFAULTS))
        if unknown:
            raise TypeError(f"unknown options: {', '.join(unknown)}")
        yield from self._generate({**_OPTION_DEFAULTS, **options, "prompt": prompt}, seed, generator, draws, False, {})

    # -- request checks -----------------------------------------------------------------------------
    def describe_build(self) -> str:
        g = self.geometry
        return (f"{g.batch} image(s) per call ({self.profile.prompts} prompt(s) x {self.profile.images_per_prompt}), "
                f"CFG {'on' if g.cfg else 'off'}, up to {g.max_latent_length} latent frame(s), "
                f"up to {g.max_tokens_per_step} tokens per mask step")

    def check(self, request: Request) -> None:
        """Refuse requests the graphs cannot serve, naming what they were built for."""
        from runtime.schedules import mask_schedule

        g, built = self.geometry, f"these engines were built for {self.describe_build()}"
        if request.batch > g.batch:
            raise ValueError(f"{request.num_prompts} prompt(s) x {request.num_images_per_prompt} image(s) = "
                             f"{request.batch} images per call; {built}")
        if request.guided != g.cfg:
            raise ValueError(f"guidance_scale {request.guidance_scale:g} {'needs' if request.guided else 'turns off'} "
                             f"classifier-free guidance; {built} (rebuild with{'' if request.guided else ' --no-cfg'})")
        if request.max_latent_length > g.max_latent_length:
            raise ValueError(f"max_latent_length {request.max_latent_length} exceeds the KV cache; {built}")
        if request.image is not None and "vae_encoder" not in self.specs:
            raise ValueError(f"image-to-video needs the VAE encoder graph, which was not built; {built}")
        peak = max(mask_schedule(g.num_tokens, request.num_inference_steps))
        if peak > g.max_tokens_per_step:
            raise ValueError(f"num_inference_steps {request.num_inference_steps} predicts up to {peak} tokens in one "
                             f"step; {built} (build for fewer minimum mask steps)")
        if request.prompts is not None:
            rows = request.num_prompts * (2 if request.guided and request.negative_prompts else 1)
            if rows > g.text_batch:
                raise ValueError(f"{rows} prompts to encode in one call; {built}")

    # -- the loops ------------------------------------------------------------------------------------
    def _generate(self, options: dict, seed, generator, draws, return_timings: bool,
                  result: dict) -> Iterator[np.ndarray]:
        request = validate_request(self.config, **options)
        self.check(request)
        draws = draws or RandomDraws(_generator(seed, generator))
        with self._lock:
            timer = _Timer(self.backend, return_timings)
            latents = []
            yield from self._run(request, draws, timer, latents)
            result["latents"] = np.stack(latents, axis=2)[: request.batch]
            if return_timings:
                result["timings"] = dict(timer.seconds)

    def _run(self, request: Request, draws: RandomDraws, timer: _Timer, latents: list) -> Iterator[np.ndarray]:
        from runtime.schedules import SamplerTable, mask_schedule

        g, backend, run = self.geometry, self.backend, self.backend.run
        batch, frames = request.batch, request.max_latent_length
        draw_dtype = _torch_dtype(self.specs["denoise"].precision)
        schedule = mask_schedule(g.num_tokens, request.num_inference_steps)
        sampler = SamplerTable.from_scheduler(self.checkpoint.scheduler, request.num_diffusion_steps)
        coefficients = sampler.coefficients.numpy().astype(np.float32)
        timesteps = sampler.timesteps.numpy().astype(np.float32).reshape(-1, 1)
        clip = np.array([sampler.clip_range if sampler.clip_range is not None else NO_CLIP], np.float32)
        guidance = np.array([request.guidance_scale], np.float32)

        with timer.stage("text"):
            prefill = self._text_inputs(request)
        first_latent = None
        if request.image is not None:  # the posterior sample is the first draw
            noise = _numpy(draws.normal((1, g.channels, *g.latent_size), _torch_dtype("fp32")))
            with timer.stage("vae"):
                encoded = run("vae_encoder", {"image": backend.upload(request.image[None]),
                                              "noise": backend.upload(noise.astype(np.float32))})["latent"]
            first_latent = np.repeat(backend.download(encoded), g.batch, axis=0)

        prefill["frame_position"] = frame_position(0, frames, g.base_t)
        with timer.stage("temporal"):
            out = run("temporal_prefill", {k: backend.upload(v) for k, v in prefill.items()})
        indicator = anchor = out["indicator"]
        cache = (out.get("k_cache"), out.get("v_cache"))

        order = None
        decoded_until = 0
        for t in range(frames):
            if t > 0:
                inputs = {"prev_latent": backend.upload(latents[-1]),
                          "frame_position": frame_position(t, frames, g.base_t),
                          "k_cache": cache[0], "v_cache": cache[1],
                          "cache_length": np.array([g.condition_len + t * g.num_video_tokens], np.int64)}
                if g.has_mixer:
                    inputs["anchor"] = anchor
                with timer.stage("temporal"):
                    out = run("temporal_step", {k: backend.upload(v) if isinstance(v, np.ndarray) else v
                                                for k, v in inputs.items()})
                indicator, cache = out["indicator"], (out["k_cache_out"], out["v_cache_out"])
            if t == 0 and first_latent is not None:
                latents.append(first_latent)
            else:
                if order is None:
                    u = draws.uniform((batch, g.num_tokens, 1), draw_dtype)
                    order = _pad_rows(_numpy(u.argsort(dim=1))[..., 0], g.batch)
                latents.append(self._frame(indicator, order, schedule, sampler, coefficients, timesteps, clip,
                                           guidance, draws, draw_dtype, batch, timer))
            yield from self._decode_ready(latents, frames, decoded_until, request.batch, timer)
            decoded_until = self._decoded_count(len(latents), frames)

    def _frame(self, indicator, order, schedule, sampler, coefficients, timesteps, clip, guidance, draws,
               draw_dtype, batch, timer) -> np.ndarray:
        """One latent frame, set by set. -> canvas [B_built, C, h, w] float32 (host)."""
        g, backend, run = self.geometry, self.backend, self.backend.run
        n_max, shape = g.max_tokens_per_step, (batch, g.channels, *g.latent_size)
        canvas = backend.upload(np.zeros((g.batch, g.channels, *g.latent_size), np.float32))
        # Constant across mask steps: upload once per frame, not once per diffusion step.
        constants = {"clip_range": backend.upload(clip), "guidance_scale": backend.upload(guidance)}
        per_step = [{"timestep": backend.upload(timesteps[j]), "coefficients": backend.upload(coefficients[j])}
                    for j in range(len(timesteps))]
        unknown = np.ones((g.batch, g.num_tokens, 1), np.float32)
        position = 0
        for count in schedule:
            # Distinct ids per row: this step's tokens, then the next ones of the order (marked invalid).
            selected = np.take(order, (position + np.arange(n_max)) % g.num_tokens, axis=1)
            valid = np.broadcast_to(np.arange(n_max) < count, selected.shape).copy()
            rows = _gather_rows(draws.normal(shape, draw_dtype), selected, g)
            with timer.stage("spatial"):
                z = run("spatial", {"canvas": canvas, "unknown_mask": backend.upload(unknown),
                                    "indicator": indicator, "selected": backend.upload(selected)})["z_selected"]
            x = backend.upload(rows)
            for j in range(len(timesteps)):
                noise = _gather_rows(draws.normal(shape, draw_dtype), selected, g) if sampler.draws_noise(j) else \
                    np.zeros_like(rows)
                with timer.stage("denoise"):
                    x = run("denoise", {"x": x, "z_selected": z, "noise": backend.upload(noise),
                                        **per_step[j], **constants})["x_next"]
            with timer.stage("denoise"):
                canvas = run("place", {"canvas": canvas, "x": x, "selected": backend.upload(selected),
                                       "valid": backend.upload(valid)})["canvas_out"]
            np.put_along_axis(unknown[..., 0], selected[:, :count], 0.0, axis=1)
            position += count
        return backend.download(canvas).astype(np.float32)

    # -- decoding -----------------------------------------------------------------------------------------
    def _decoded_count(self, available: int, frames: int) -> int:
        """Latents whose pixels have been produced once `available` latents exist."""
        window = min(VIDEO_VAE_WINDOW, frames)
        if not self.checkpoint.video_vae or window == 1:
            return available
        if available < window:
            return 0
        return window + ((available - window) // (window - 1)) * (window - 1)

    def _decode_ready(self, latents: list, frames: int, done: int, batch: int, timer: _Timer) -> Iterator[np.ndarray]:
        """Decode what became decodable: an image VAE decodes each frame; the video VAE decodes all latents
        at once up to 5, else windows of 5 with stride 4 (the official tiling), dropping the first output
        frame of later windows and latents that fill no window."""
        ready = self._decoded_count(len(latents), frames)
        if ready == done:
            return
        backend, run = self.backend, self.backend.run
        if not self.checkpoint.video_vae:
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
        repeated per image, padded to the built batch), then the unconditional rows."""
        from runtime.model.text_encoder import tokenize

        g = self.geometry
        hidden = np.zeros((0, g.text_len, g.text_dim), np.float32)
        if request.prompts is not None:
            texts = request.prompts + (request.negative_prompts if request.guided and request.negative_prompts else [])
            ids, lengths = tokenize(self.tokenizer, texts, g.text_len)
            hidden = self.backend.download(self.backend.run(
                "text_encoder", {"input_ids": self.backend.upload(ids.numpy())})["hidden"]).astype(np.float32)
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
            rows += _pad_rows([r for r in uncond for _ in range(request.num_images_per_prompt)], g.batch)
        out = {"text_hidden": np.stack([r[0] for r in rows]), "text_lengths": np.array([r[1] for r in rows], np.int64)}
        if g.has_motion:
            out["motion_flow"] = np.full((g.model_batch,), request.motion_flow, np.float32)
        return out


def _onnx_file(entry: dict) -> str:
    return next(a["file"] for a in entry["artifacts"] if a["file"].endswith(".onnx"))


def _engine_file(entry: dict) -> str:
    return next(a["file"] for a in entry["engine"]["artifacts"] if a["file"].endswith(".plan"))


def _has_engines(folder: Path) -> bool:
    return any(folder.glob("*.plan"))


def _tensorrt_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


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


def _gather_rows(noise, selected: np.ndarray, g: Geometry) -> np.ndarray:
    """Noise drawn for the whole canvas [B, C, h, w] -> the selected tokens' values [B_built, n_max, 16]."""
    tokens = _pad_rows(_patchify(_numpy(noise).astype(np.float32), g.patch), g.batch)
    return np.take_along_axis(tokens, selected[..., None], axis=1)


def _numpy(value) -> np.ndarray:
    return value.float().cpu().numpy() if hasattr(value, "cpu") and str(value.dtype) == "torch.bfloat16" else \
        (value.cpu().numpy() if hasattr(value, "cpu") else np.asarray(value))


def _torch_dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def _generator(seed: int | None, generator):
    if generator is not None:
        if seed is not None:
            raise ValueError("give at most one of seed and generator")
        return generator
    if seed is None:
        return None
    import torch

    return torch.Generator().manual_seed(int(seed))
