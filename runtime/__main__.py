"""Command line.

    python -m runtime generate --engines DIR --prompt "..." --out out.png|out.mp4   (the runner, over built engines)
    python -m runtime reference (--checkpoint DIR | --synthetic VARIANT) --prompt "..." --out ...   (eager reference)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

SYNTHETIC_ROOT = Path("checkpoints/synthetic")


def resolve_checkpoint(checkpoint: str | None, synthetic: str | None, seed: int = 0) -> Path:
    """A checkpoint folder: the given one, or a synthetic variant (written on first use)."""
    from runtime.checkpoint import synthesize

    if checkpoint:
        return Path(checkpoint)
    folder = SYNTHETIC_ROOT / synthetic
    if not folder.exists():
        print(f"writing synthetic {synthetic} checkpoint to {folder} (first use)")
        synthesize(synthetic, folder, seed)
    else:
        print(f"using synthetic {synthetic} checkpoint in {folder}")
    return folder


def save_output(pixels: np.ndarray, out: Path, fps: int) -> list[Path]:
    """One PNG per image, or an mp4 (plus a PNG strip beside it) per video."""
    from runtime.media import write_mp4, write_png, write_strip

    written = []
    for i, sample in enumerate(pixels):
        path = out if len(pixels) == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}")
        if sample.ndim == 3:
            written.append(write_png(sample, path))
        else:
            written.append(write_mp4(sample, path, fps))
            written.append(write_strip(sample, path.with_suffix(".png")))
    return written


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--steps", type=int, default=64, help="mask (set-by-set) steps per frame (default 64)")
    parser.add_argument("--diffusion-steps", type=int, default=25, help="denoising steps per mask step (default 25)")
    parser.add_argument("--guidance-scale", type=float, default=5.0, help="classifier-free guidance (default 5)")
    parser.add_argument("--latent-length", type=int, default=1, help="latent frames; 1 = image (default 1)")
    parser.add_argument("--motion-flow", type=float, help="video motion strength (video checkpoints; default 5)")
    parser.add_argument("--image", help="PNG at the model resolution: image-to-video from this first frame")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fps", type=_frame_rate, default=12, help="mp4 frame rate, 1 to 240 (default 12)")
    parser.add_argument("--out", required=True, type=Path, help="output .png (image) or .mp4 (video)")


def _frame_rate(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 240:
        raise argparse.ArgumentTypeError(f"must be 1 to 240, got {value}")
    return value


def _options(args) -> dict:
    image = None
    if args.image:
        from PIL import Image

        image = np.asarray(Image.open(args.image).convert("RGB"))
    return dict(negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                num_diffusion_steps=args.diffusion_steps, guidance_scale=args.guidance_scale,
                max_latent_length=args.latent_length, motion_flow=args.motion_flow, image=image)


def _check_suffix(out: Path, video: bool) -> None:
    expected = ".mp4" if video else ".png"
    if out.suffix != expected:
        raise ValueError(f"this request produces {'a video' if video else 'an image'}: --out must end in {expected}")


def _generate(args) -> str:
    from runtime.runner import NOVARunner

    start = time.perf_counter()
    runner = NOVARunner.from_engines(args.engines, backend=args.backend, device=args.device)
    loaded = time.perf_counter()
    options = _options(args)
    _check_suffix(args.out, options["max_latent_length"] > 1)
    output = runner(args.prompt, seed=args.seed, return_timings=True, progress=True, **options)
    pixels = output.images if output.images is not None else output.frames
    written = save_output(pixels, args.out, args.fps)
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in output.timings.items())
    return (f"{runner.backend.name} backend: loaded in {loaded - start:.1f} s, generated in "
            f"{time.perf_counter() - loaded:.1f} s ({stages}); wrote " + ", ".join(str(p) for p in written))


def _reference(args) -> str:
    import torch

    from runtime.reference import ReferencePipeline

    folder = resolve_checkpoint(args.checkpoint, args.synthetic)
    start = time.perf_counter()
    pipe = ReferencePipeline.from_pretrained(folder)
    loaded = time.perf_counter()
    options = _options(args)
    _check_suffix(args.out, options["max_latent_length"] > 1)
    output = pipe(args.prompt, generator=torch.Generator().manual_seed(args.seed), **options)
    pixels = output.images if output.images is not None else output.frames
    written = save_output(pixels, args.out, args.fps)
    return (f"loaded in {loaded - start:.1f} s, generated in {time.perf_counter() - loaded:.1f} s; wrote "
            + ", ".join(str(p) for p in written))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime", description="NOVA runtime commands.")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate with NOVARunner over engines built by export/build_engines.py",
                              description="Generate an image (PNG) or a video (mp4 + PNG strip) with the compiled "
                                          "runtime over an engine folder.")
    gen.add_argument("--engines", required=True, help="engine folder written by export/build_engines.py")
    gen.add_argument("--backend", default="auto", choices=("auto", "tensorrt", "onnxruntime", "torch"),
                     help="auto: TensorRT where the folder has engines, TensorRT is installed and the device is not cpu; "
                          "else ONNX Runtime")
    gen.add_argument("--device", help="cpu, or cuda / cuda:N (default: cuda for TensorRT, else cpu)")
    _add_generation_options(gen)
    ref = commands.add_parser("reference", help="generate with the eager PyTorch reference pipeline",
                              description="Generate an image (PNG) or a video (mp4 + PNG strip) with the "
                                          "eager reference pipeline, the parity baseline of the compiled runtime.")
    source = ref.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="an official NOVA checkpoint folder (diffusers layout)")
    source.add_argument("--synthetic", metavar="VARIANT", help="a synthetic random-weight variant, e.g. tiny-t2i")
    _add_generation_options(ref)
    args = parser.parse_args(argv)

    from runtime.configs import CheckpointError

    try:
        message = _generate(args) if args.command == "generate" else _reference(args)
    except (ValueError, CheckpointError, FileExistsError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
