"""Command line.

    python -m runtime generate --engines DIR --prompt "..." --out out.png|out.mp4   (the runner, over built engines)
    python -m runtime reference (--checkpoint DIR | --synthetic VARIANT) --prompt "..." --out ...   (eager reference)

The generation flags are made from the option declarations (`runtime.options`) and named after the
options they set (`--num-inference-steps` sets num_inference_steps); `--steps`, `--diffusion-steps` and
`--latent-length` remain as short aliases. The request, `--seed` and `--out` are checked before anything
is loaded (for `reference`, before torch is imported). Exit status: 0 done, 2 refused, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

# Only light modules here: PIL, PyAV and the config and request readers load inside the commands, so
# --help and argument errors answer at once.
from runtime.cli import HelpFormatter, add_version, positive_int, progress_stream
from runtime.options import FPS, OPTIONS, SEED, SEED_LIMIT, Option
from runtime.variants import SYNTHETIC_ROOT, VARIANT_NAMES

# The options that are flags: the numbers and the negative prompt. --prompt (one string, required) and
# --image (a file) are written out below; arrays (latents, text features) have no flag.
FLAG_OPTIONS = tuple(o for o in OPTIONS.values() if o.type in (int, float) or o.name == "negative_prompt")
SHORT_ALIASES = {"num_inference_steps": "--steps", "num_diffusion_steps": "--diffusion-steps",
                 "max_latent_length": "--latent-length"}
DEFAULT_THREADS = len(os.sched_getaffinity(0))  # the CPUs this process may use: more threads only oversubscribe

# Options named in the runner's messages -> the flags that set them. Only the underscored names: "prompt"
# and "image" are also plain words of those messages.
_FLAGS = {o.name: o.flag for o in FLAG_OPTIONS if "_" in o.name}
_OPTION_NAMES = re.compile(r"\b(" + "|".join(_FLAGS) + r")\b")


def flag_names(message: str) -> str:
    """A runner message as the command line's user needs it: `num_inference_steps` -> `--num-inference-steps`."""
    return _OPTION_NAMES.sub(lambda match: _FLAGS[match.group(1)], message)


def save_output(pixels: np.ndarray, out: Path, fps: int) -> list[Path]:
    """One PNG per image, or an mp4 (plus a PNG strip beside it) per video. A one-frame video (a video
    checkpoint asked for one latent frame) is an image: one PNG, the path the request was checked for."""
    from runtime.media import write_mp4, write_png, write_strip

    written = []
    for i, sample in enumerate(pixels):
        path = out if len(pixels) == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}")
        if sample.ndim == 4 and len(sample) == 1:
            sample = sample[0]
        if sample.ndim == 3:
            written.append(write_png(sample, path))
        else:
            written.append(write_mp4(sample, path, fps))
            written.append(write_strip(sample, path.with_suffix(".png")))
    return written


def _checked(option: Option) -> Callable[[str], Any]:
    """An argparse type: the option's own range check, so a flag error reads like the request's."""
    def check(text: str):
        try:
            return option.check(option.type(text))
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error).removeprefix(f"{option.name} ")) from None
    return check


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    gen = parser.add_argument_group("generation (the pipeline's options, with its defaults)")
    gen.add_argument("--prompt", required=True, metavar="TEXT", help="what to generate")
    for option in FLAG_OPTIONS:
        unset = f" (default: None {option.unset})" if option.unset else ""
        gen.add_argument(option.flag, *filter(None, [SHORT_ALIASES.get(option.name)]), type=option.type,
                         default=option.default, metavar=option.metavar, help=option.help + unset)
    gen.add_argument("--image", type=Path, metavar="PNG",
                     help="an image of any size (centre-cropped and resized to the model resolution, as the "
                          "official demo does): image-to-video from this first frame")
    gen.add_argument(SEED.flag, type=_checked(SEED), default=0, metavar="N",
                     help=f"{SEED.help}, {SEED.minimum} <= N < 2**{SEED_LIMIT.bit_length() - 1}")
    gen.add_argument("--threads", type=positive_int, default=DEFAULT_THREADS, metavar="N",
                     help="intra-op threads of torch (reference) and ONNX Runtime (generate); default: the CPUs "
                          f"this process may run on ({DEFAULT_THREADS} here)")
    out = parser.add_argument_group("output")
    out.add_argument("--out", required=True, type=Path, metavar="PATH",
                     help="an image: .png; a video: .mp4, with a .png strip of its frames beside it")
    out.add_argument(FPS.flag, type=_checked(FPS), default=FPS.default, metavar="N",
                     help=f"{FPS.help}, {FPS.minimum} to {FPS.maximum}")


def _options(args: argparse.Namespace) -> dict:
    """The request's options as the runner and the reference take them."""
    from PIL import Image

    image = np.asarray(Image.open(args.image).convert("RGB")) if args.image else None
    return {o.name: getattr(args, o.name) for o in FLAG_OPTIONS} | {"image": image}


def _transformer_config(folder: Path):
    """The config the request is checked against before loading; None where the folder cannot give it
    (loading the folder then says what is wrong with it)."""
    from runtime.configs import CheckpointError, transformer_config

    try:
        return transformer_config(folder)
    except CheckpointError:
        return None


def _check_out(out: Path, video: bool) -> None:
    """--out before any work: the suffix the request needs (any case), and a folder it can be written in."""
    expected = ".mp4" if video else ".png"
    if out.suffix.lower() != expected:
        raise ValueError(f"this request produces {'a video' if video else 'an image'}: --out must end in "
                         f"{expected}, got {out}")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder")
    folder = out.absolute().parent
    existing = next(p for p in (folder, *folder.parents) if p.exists())  # the writers create the rest
    if not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is not a folder")
    try:  # a real write: os.access says yes to root, and knows nothing of read-only file systems
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as error:
        raise ValueError(f"--out {out}: cannot write in {existing} ({error.strerror})") from None


def _check_request(args: argparse.Namespace, options: dict, config) -> None:
    """The request first (the runner's own check, so the same messages), then --out."""
    from runtime.request import validate_request

    if config is not None:
        validate_request(config, args.prompt, **options)
    _check_out(args.out, options["max_latent_length"] > 1)


@contextlib.contextmanager
def _ort_threads(threads: int) -> Iterator[None]:
    """ONNX Runtime's thread count for the sessions opened inside (the backend reads NOVA_ORT_THREADS)."""
    before = os.environ.get("NOVA_ORT_THREADS")
    os.environ["NOVA_ORT_THREADS"] = str(threads)
    try:
        yield
    finally:
        if before is None:
            del os.environ["NOVA_ORT_THREADS"]
        else:
            os.environ["NOVA_ORT_THREADS"] = before


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op thread count inside; the caller's again after (main() may run in a caller's process)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _generate(args: argparse.Namespace) -> str:
    from runtime.engine_folder import CONFIGS_DIR

    options = _options(args)
    if args.compile and args.backend != "torch":
        raise ValueError(f"--compile needs --backend torch (torch.compile runs the graphs' PyTorch modules), got "
                         f"--backend {args.backend}")
    _check_request(args, options, _transformer_config(Path(args.engines) / CONFIGS_DIR))

    from runtime.runner import NOVARunner

    start = time.perf_counter()
    with _ort_threads(args.threads):
        runner = NOVARunner.from_engines(args.engines, backend=args.backend, device=args.device, compile=args.compile)
    loaded = time.perf_counter()
    print(f"loaded {args.engines} in {loaded - start:.1f} s; generating", file=sys.stderr, flush=True)
    with progress_stream() as stderr, contextlib.redirect_stderr(stderr):  # the runner's bar writes to stderr
        output = runner(args.prompt, seed=args.seed, return_timings=True, progress=True, **options)
    pixels = output.images if output.images is not None else output.frames
    written = save_output(pixels, args.out, args.fps)
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in output.timings.items())
    return (f"{runner.backend.name} backend: loaded in {loaded - start:.1f} s, generated in "
            f"{time.perf_counter() - loaded:.1f} s ({stages}); wrote " + ", ".join(str(p) for p in written))


def _reference(args: argparse.Namespace) -> str:
    options = _options(args)
    # A synthetic variant not written yet has no config to check against until it is (after torch).
    config = _transformer_config(Path(args.checkpoint) if args.checkpoint else SYNTHETIC_ROOT / args.synthetic)
    _check_request(args, options, config)

    import torch

    from runtime.checkpoint import resolve_checkpoint
    from runtime.reference import ReferencePipeline

    folder = resolve_checkpoint(args.checkpoint, args.synthetic)
    if config is None:
        _check_request(args, options, _transformer_config(folder))
    with _torch_threads(args.threads):
        start = time.perf_counter()
        pipe = ReferencePipeline.from_pretrained(folder)
        loaded = time.perf_counter()
        print(f"loaded {folder} in {loaded - start:.1f} s; generating", file=sys.stderr, flush=True)
        with progress_stream() as stderr, contextlib.redirect_stderr(stderr):
            output = pipe(args.prompt, generator=torch.Generator().manual_seed(args.seed), disable_progress_bar=False,
                          output_type="np", **options)
    pixels = output.images if output.images is not None else output.frames
    written = save_output(pixels, args.out, args.fps)
    return (f"loaded in {loaded - start:.1f} s, generated in {time.perf_counter() - loaded:.1f} s; wrote "
            + ", ".join(str(p) for p in written))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime", description="NOVA runtime commands.",
                                formatter_class=HelpFormatter)
    add_version(p)
    commands = p.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate with NOVARunner over engines built by export/build_engines.py",
                              description="Generate an image (PNG) or a video (mp4 + PNG strip) with the compiled "
                                          "runtime over an engine folder.", formatter_class=HelpFormatter)
    engines = gen.add_argument_group("engines")
    engines.add_argument("--engines", required=True, metavar="DIR",
                         help="engine folder written by export/build_engines.py")
    engines.add_argument("--backend", default="auto", choices=("auto", "tensorrt", "onnxruntime", "torch"),
                         help="auto: TensorRT where the folder has engines, TensorRT is installed and the device is "
                              "not cpu; else ONNX Runtime")
    engines.add_argument("--device", metavar="DEVICE",
                         help="cpu, or cuda / cuda:N (default: cuda for TensorRT, else cpu)")
    engines.add_argument("--compile", action="store_true",
                         help="with --backend torch: the per-step graphs through torch.compile (inductor): about a "
                              "minute of compilation in the first request of a process, faster steps after it")
    _add_generation_options(gen)
    ref = commands.add_parser("reference", help="generate with the eager PyTorch reference pipeline",
                              description="Generate an image (PNG) or a video (mp4 + PNG strip) with the eager "
                                          "reference pipeline, the parity baseline of the compiled runtime.",
                              formatter_class=HelpFormatter)
    source = ref.add_argument_group("model").add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="DIR", help="an official NOVA checkpoint folder (diffusers layout)")
    source.add_argument("--synthetic", metavar="VARIANT", choices=VARIANT_NAMES,
                        help="a synthetic random-weight variant (written to checkpoints/synthetic/VARIANT on first "
                             f"use); one of {', '.join(VARIANT_NAMES)}")
    _add_generation_options(ref)
    synth = commands.add_parser("synth", help="write a synthetic random-weight checkpoint in the official layout",
                                description="Write a random-weight NOVA checkpoint of a released variant's sizes, "
                                            "file for file like the official folders.", formatter_class=HelpFormatter)
    synth.add_argument("--variant", required=True, choices=VARIANT_NAMES, help="the model to imitate")
    synth.add_argument("--out", required=True, metavar="DIR", help="folder to create (must not exist or be empty)")
    synth.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    return p


def _synth(args: argparse.Namespace) -> str:
    from runtime.checkpoint import synthesize

    return f"wrote synthetic {args.variant} checkpoint (seed {args.seed}) to {synthesize(args.variant, args.out, args.seed)}"


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)  # before the heavy imports: --help and argument errors answer at once
    try:
        message = {"generate": _generate, "reference": _reference, "synth": _synth}[args.command](args)
    except KeyboardInterrupt:  # nothing half-written stays behind: the writers rename finished files into place
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as error:  # CheckpointError is a ValueError
        print(f"error: {flag_names(str(error))}", file=sys.stderr)
        return 2
    print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
