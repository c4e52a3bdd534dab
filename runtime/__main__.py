"""Command line.

    python -m runtime generate --engines DIR --prompt "..." --out out.png|out.mp4   (the runner, over built engines)
    python -m runtime reference (--checkpoint DIR | --synthetic VARIANT) --prompt "..." --out ...   (eager reference)

Flags are named after the pipeline options they set (`--num-inference-steps` sets num_inference_steps);
`--steps`, `--diffusion-steps` and `--latent-length` remain as short aliases. The request and `--out`
are checked before anything is loaded. Exit status: 0 done, 2 refused, 130 interrupted.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from runtime.cli import HelpFormatter, add_version
from runtime.variants import VARIANT_NAMES

# Pipeline options named in the runner's messages -> the flags that set them. Only the underscored
# names: "prompt" and "image" are also plain words of those messages.
_FLAGS = {name: "--" + name.replace("_", "-") for name in (
    "num_inference_steps", "num_diffusion_steps", "guidance_scale", "max_latent_length", "motion_flow",
    "negative_prompt")}
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


def _frame_rate(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 240:
        raise argparse.ArgumentTypeError(f"must be 1 to 240, got {value}")
    return value


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    gen = parser.add_argument_group("generation (the pipeline's options, with its defaults)")
    gen.add_argument("--prompt", required=True, metavar="TEXT", help="what to generate")
    gen.add_argument("--negative-prompt", metavar="TEXT",
                     help="what to steer away from (default: the learned null text)")
    gen.add_argument("--num-inference-steps", "--steps", type=int, default=64, metavar="N",
                     help="mask (set-by-set) steps per frame")
    gen.add_argument("--num-diffusion-steps", "--diffusion-steps", type=int, default=25, metavar="N",
                     help="denoising steps of the diffusion head per mask step")
    gen.add_argument("--guidance-scale", type=float, default=5.0, metavar="SCALE",
                     help="classifier-free guidance; <= 1 turns it off")
    gen.add_argument("--max-latent-length", "--latent-length", type=int, default=1, metavar="N",
                     help="latent frames: 1 = an image; on video checkpoints n > 1 = 1 + 4 (n - 1) frames")
    gen.add_argument("--motion-flow", type=float, metavar="FLOW",
                     help="motion strength of video checkpoints (default: 5; image checkpoints ignore it)")
    gen.add_argument("--image", type=Path, metavar="PNG",
                     help="an image of any size (centre-cropped and resized to the model resolution, as the "
                          "official demo does): image-to-video from this first frame")
    gen.add_argument("--seed", type=int, default=0, metavar="N", help="seed of every random draw")
    out = parser.add_argument_group("output")
    out.add_argument("--out", required=True, type=Path, metavar="PATH",
                     help="an image: .png; a video: .mp4, with a .png strip of its frames beside it")
    out.add_argument("--fps", type=_frame_rate, default=12, metavar="N", help="mp4 frame rate, 1 to 240")


def _options(args: argparse.Namespace) -> dict:
    image = None
    if args.image:
        from PIL import Image

        image = np.asarray(Image.open(args.image).convert("RGB"))
    return dict(negative_prompt=args.negative_prompt, num_inference_steps=args.num_inference_steps,
                num_diffusion_steps=args.num_diffusion_steps, guidance_scale=args.guidance_scale,
                max_latent_length=args.max_latent_length, motion_flow=args.motion_flow, image=image)


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


def _generate(args: argparse.Namespace) -> str:
    from runtime.engine_folder import CONFIGS_DIR

    options = _options(args)
    _check_request(args, options, _transformer_config(Path(args.engines) / CONFIGS_DIR))

    from runtime.runner import NOVARunner

    start = time.perf_counter()
    runner = NOVARunner.from_engines(args.engines, backend=args.backend, device=args.device)
    loaded = time.perf_counter()
    print(f"loaded {args.engines} in {loaded - start:.1f} s; generating", file=sys.stderr, flush=True)
    output = runner(args.prompt, seed=args.seed, return_timings=True, progress=sys.stderr.isatty(), **options)
    pixels = output.images if output.images is not None else output.frames
    written = save_output(pixels, args.out, args.fps)
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in output.timings.items())
    return (f"{runner.backend.name} backend: loaded in {loaded - start:.1f} s, generated in "
            f"{time.perf_counter() - loaded:.1f} s ({stages}); wrote " + ", ".join(str(p) for p in written))


def _reference(args: argparse.Namespace) -> str:
    from runtime.checkpoint import resolve_checkpoint

    folder = resolve_checkpoint(args.checkpoint, args.synthetic)
    options = _options(args)
    _check_request(args, options, _transformer_config(folder))

    import torch

    from runtime.reference import ReferencePipeline

    start = time.perf_counter()
    pipe = ReferencePipeline.from_pretrained(folder)
    loaded = time.perf_counter()
    print(f"loaded {folder} in {loaded - start:.1f} s; generating", file=sys.stderr, flush=True)
    output = pipe(args.prompt, generator=torch.Generator().manual_seed(args.seed),
                  disable_progress_bar=not sys.stderr.isatty(), output_type="np", **options)
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
