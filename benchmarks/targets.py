"""What the benchmarks run: the reference pipeline or a NOVARunner backend, loaded and instrumented.

A target is written `KIND[:PRECISION]`:

    reference:fp32     runtime.reference.ReferencePipeline (eager, the official algorithm), weights in fp32
    reference:fp16     the same in fp16, as the official code runs on a GPU
    torch:fp32         NOVARunner.from_checkpoint (the graphs' PyTorch modules, no export)
    onnxruntime:fp32   NOVARunner.from_engines(<engine folder built at fp32>, backend="onnxruntime")
    tensorrt:fp16      NOVARunner.from_engines(<engine folder with TensorRT plans>, backend="tensorrt")
    official:fp32      the official NOVAPipeline (baaivision/NOVA's diffnext, from a checkout: benchmarks/official.py)

Both kinds report the same stages (text, temporal, spatial, denoise, vae): the runner times its own
graph calls (`return_timings=True`); the reference is timed by wrapping, on the loaded instance only,
the methods that make up each stage:

    text      ReferencePipeline.text_features (Phi-2)
    temporal  transformer.condition / frame_tokens / temporal / indicator (+ video_pos_embed)
    spatial   transformer.spatial
    denoise   ReferencePipeline.denoise (diffusion MLP, CFG, sampler; the runner's denoise_loop graph, or
              denoise + place at a step count the build did not unroll)
    vae       vae.decode

The official pipeline is timed the same way, on its own modules: text = NOVAPipeline.encode_prompt (Phi-2)
and transformer.text_embed, temporal = video_encoder and video_pos_embed, spatial = image_encoder, denoise =
transformer.denoise (MLP and sampler), vae = vae.decode.

    other     the rest of the call (host work: random draws, argsort, index tables, copies)

On a GPU each timed region ends with a device synchronize, so stage timings are taken in separate
"instrumented" repetitions and the end-to-end latency in plain ones (see latency.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

STAGES = ("text", "temporal", "spatial", "denoise", "vae")
KINDS = ("official", "reference", "torch", "inductor", "onnxruntime", "tensorrt")  # inductor: torch + torch.compile
PRECISIONS = ("fp32", "fp16", "bf16")


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    kind: str
    precision: str

    @classmethod
    def parse(cls, text: str, default_precision: str = "fp32") -> "TargetSpec":
        kind, _, precision = text.strip().partition(":")
        precision = precision or default_precision
        if kind not in KINDS:
            raise ValueError(f"unknown target kind {kind!r} in {text!r}; one of {', '.join(KINDS)}")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r} in {text!r}; one of {', '.join(PRECISIONS)}")
        return cls(kind, precision)

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.precision}"

    @property
    def needs_engines(self) -> bool:
        return self.kind in ("onnxruntime", "tensorrt")

    @property
    def is_reference(self) -> bool:
        return self.kind == "reference"

    @property
    def is_pipeline(self) -> bool:
        """An eager pipeline called with the official arguments (ours or the official code), not a runner."""
        return self.kind in ("reference", "official")


class Clock:
    """Accumulates seconds and calls per name; `sync` runs before each clock read (device work)."""

    def __init__(self, sync: Callable[[], None] | None = None):
        self.sync = sync or (lambda: None)
        self.enabled = True
        self.depth = 0
        self.reset()

    def reset(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    @contextlib.contextmanager
    def region(self, name: str):
        if not self.enabled or self.depth:  # only the outermost region counts
            yield
            return
        self.depth += 1
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[name] += time.perf_counter() - start
            self.calls[name] += 1
            self.depth -= 1

    def wrap(self, owner: Any, attribute: str, name: str) -> None:
        """Replace `owner.attribute` (a bound method) on this instance by a timed call."""
        original = getattr(owner, attribute)

        def timed(*args, **kwargs):
            with self.region(name):
                return original(*args, **kwargs)

        setattr(owner, attribute, timed)  # an instance attribute: the class and other instances are untouched


@dataclasses.dataclass
class RunResult:
    output: Any  # PipelineOutput or RunnerOutput
    seconds: float  # end to end, wall clock
    stages: dict[str, float]  # empty when not instrumented
    calls: dict[str, dict[str, float]]  # per stage (reference) or per graph (runner): calls, seconds


class Target:
    """A loaded reference pipeline or runner; `run(...)` generates once and reports timings."""

    def __init__(self, spec: TargetSpec, checkpoint: Path, device: str, *, engines: Path | None = None,
                 profile=None, official: Path | None = None):
        import torch

        self.spec, self.checkpoint, self.device = spec, Path(checkpoint), device
        cuda = device.startswith("cuda")
        self.clock = Clock(sync=(lambda: torch.cuda.synchronize(device)) if cuda else None)
        self.graph_clock = Clock(sync=self.clock.sync)
        start = time.perf_counter()
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[spec.precision]
        if spec.kind == "official":
            from benchmarks.official import load_pipeline

            if official is None:
                raise ValueError("the official target needs --official PATH (a checkout of baaivision/NOVA)")
            self.pipe = load_pipeline(official, self.checkpoint, dtype, device)
            self._instrument_official()
        elif spec.is_reference:
            from runtime.reference import ReferencePipeline

            self.pipe = ReferencePipeline.from_pretrained(self.checkpoint, device=device, dtype=dtype)
            self._instrument_reference()
        else:
            from runtime.runner import NOVARunner

            if spec.kind in ("torch", "inductor"):
                self.runner = NOVARunner.from_checkpoint(self.checkpoint, profile, precision=spec.precision,
                                                         device=device, compile=spec.kind == "inductor")
            else:
                if engines is None:
                    raise ValueError(f"{spec.label} needs an engine folder")
                self.runner = NOVARunner.from_engines(engines, backend=spec.kind, device=device)
            self._instrument_runner()
        self.load_seconds = time.perf_counter() - start

    # -- instrumentation --------------------------------------------------------------------------------
    def _instrument_reference(self) -> None:
        pipe, model, clock = self.pipe, self.pipe.transformer, self.clock
        clock.wrap(pipe, "text_features", "text")
        for method in ("condition", "frame_tokens", "temporal", "indicator"):
            clock.wrap(model, method, "temporal")
        clock.wrap(model.video_pos_embed, "forward", "temporal")
        clock.wrap(model, "spatial", "spatial")
        clock.wrap(pipe, "denoise", "denoise")
        clock.wrap(pipe.vae, "decode", "vae")

    def _instrument_official(self) -> None:
        pipe, model, clock = self.pipe, self.pipe.transformer, self.clock
        for module, name in ((model.text_embed, "text"), (model.video_encoder, "temporal"),
                             (model.video_pos_embed, "temporal"), (model.image_encoder, "spatial")):
            clock.wrap(module, "forward", name)
        clock.wrap(pipe, "encode_prompt", "text")
        clock.wrap(model, "denoise", "denoise")
        clock.wrap(pipe.vae, "decode", "vae")

    def _instrument_runner(self) -> None:
        backend, clock = self.runner.backend, self.graph_clock
        original = backend.run

        def run(graph, inputs):
            with clock.region(graph):
                return original(graph, inputs)

        backend.run = run

    # -- one generation ---------------------------------------------------------------------------------
    def run(self, prompt: str, seed: int, options: dict[str, Any], instrument: bool = True,
            draws=None) -> RunResult:
        """One generation. options: num_inference_steps, num_diffusion_steps, guidance_scale,
        max_latent_length (the official names). `draws` (runtime.draws) replaces the seed."""
        import torch

        self.clock.reset()
        self.graph_clock.reset()
        self.clock.enabled = self.graph_clock.enabled = instrument
        # Every target draws from a generator on its device, as the official code must (its draws are made on the
        # model's device): a CUDA generator's numbers are not a CPU one's, so only then are pixels comparable.
        draws_kwargs = {"generator": torch.Generator(self.device).manual_seed(seed)} if draws is None else {"draws": draws}
        start = time.perf_counter()
        if self.spec.is_pipeline:
            output = self.pipe(prompt, disable_progress_bar=True, output_type="np", **draws_kwargs, **options)
            seconds = time.perf_counter() - start
            stages = dict(self.clock.seconds) if instrument else {}
            calls = {k: {"calls": self.clock.calls[k], "seconds": v} for k, v in self.clock.seconds.items()}
        else:
            output = self.runner(prompt, **draws_kwargs, return_timings=instrument, **options)
            seconds = time.perf_counter() - start
            stages = dict(output.timings or {})
            calls = {k: {"calls": self.graph_clock.calls[k], "seconds": v} for k, v in self.graph_clock.seconds.items()}
        if instrument:
            stages = {stage: stages.get(stage, 0.0) for stage in STAGES}
            stages["other"] = max(0.0, seconds - sum(stages.values()))
        return RunResult(output=output, seconds=seconds, stages=stages, calls=calls)

    # -- memory -------------------------------------------------------------------------------------------
    def memory(self) -> dict[str, Any]:
        from benchmarks.common import current_rss_bytes, peak_rss_bytes

        out = {"rss_bytes": current_rss_bytes(), "peak_rss_bytes": peak_rss_bytes()}
        if self.device.startswith("cuda"):
            import torch

            out["cuda_allocated_bytes"] = torch.cuda.memory_allocated(self.device)
            out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
            out["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved(self.device)
        return out


def build_engines(checkpoint: Path, precision: str, out: Path, profile, backend: str = "onnxruntime",
                  exporter: str = "dynamo", threads: int = 1, report: Callable[[str], None] | None = None) -> Path:
    """Build (or reuse, by content key) an engine folder with export/build.py; -> the folder."""
    from export.build import BuildOptions, build

    build(BuildOptions(checkpoint=Path(checkpoint), out=Path(out), precision=precision, backend=backend,
                       profile=profile, exporter=exporter, threads=threads, progress=False),
          report=report or (lambda message: None))
    return Path(out)


def build_profile(checkpoint: Path, steps: int, diffusion_steps: int, frames: int, guidance_scale: float):
    """The smallest build profile serving the benchmark request (one prompt, one image), its diffusion loop
    unrolled for the request's step count (one launch per mask step, as a deployment runs it)."""
    from runtime.graphs.profile import BuildProfile

    return BuildProfile(prompts=1, images_per_prompt=1, cfg=guidance_scale > 1, min_mask_steps=steps,
                        max_latent_length=frames if frames > 1 else None, image_to_video=False,
                        diffusion_steps=diffusion_steps)
