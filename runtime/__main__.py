"""Command line: `python -m runtime reference ...` runs the eager reference pipeline to a PNG or mp4."""

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime", description="NOVA runtime commands.")
    commands = parser.add_subparsers(dest="command", required=True)
    ref = commands.add_parser("reference", help="generate with the eager PyTorch reference pipeline",
                              description="Generate an image (PNG) or a video (mp4 + PNG strip) with the "
                                          "eager reference pipeline, the parity baseline of the compiled runtime.")
    source = ref.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="an official NOVA checkpoint folder (diffusers layout)")
    source.add_argument("--synthetic", metavar="VARIANT", help="a synthetic random-weight variant, e.g. tiny-t2i")
    ref.add_argument("--prompt", required=True)
    ref.add_argument("--negative-prompt", default=None)
    ref.add_argument("--steps", type=int, default=64, help="mask (set-by-set) steps per frame (default 64)")
    ref.add_argument("--diffusion-steps", type=int, default=25, help="denoising steps per mask step (default 25)")
    ref.add_argument("--guidance-scale", type=float, default=5.0, help="classifier-free guidance (default 5)")
    ref.add_argument("--latent-length", type=int, default=1, help="latent frames; 1 = image (default 1)")
    ref.add_argument("--motion-flow", type=float, default=5.0, help="video motion strength (default 5)")
    ref.add_argument("--image", help="PNG at the model resolution: image-to-video from this first frame")
    ref.add_argument("--seed", type=int, default=0)
    ref.add_argument("--fps", type=int, default=12, help="mp4 frame rate (default 12)")
    ref.add_argument("--out", required=True, type=Path, help="output .png (image) or .mp4 (video)")
    args = parser.parse_args(argv)

    import torch

    from runtime.checkpoint import CheckpointError
    from runtime.reference import ReferencePipeline

    try:
        folder = resolve_checkpoint(args.checkpoint, args.synthetic)
        image = None
        if args.image:
            from PIL import Image

            image = np.asarray(Image.open(args.image).convert("RGB"))
        start = time.perf_counter()
        pipe = ReferencePipeline.from_pretrained(folder)
        loaded = time.perf_counter()
        output = pipe(args.prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                      num_diffusion_steps=args.diffusion_steps, guidance_scale=args.guidance_scale,
                      max_latent_length=args.latent_length, motion_flow=args.motion_flow, image=image,
                      generator=torch.Generator().manual_seed(args.seed))
        pixels = output.images if output.images is not None else output.frames
        expected = ".png" if pixels.ndim == 4 else ".mp4"
        if args.out.suffix != expected:
            raise ValueError(f"this request produces {'an image' if expected == '.png' else 'a video'}: "
                             f"--out must end in {expected}")
        written = save_output(pixels, args.out, args.fps)
    except (ValueError, CheckpointError, FileExistsError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"loaded in {loaded - start:.1f} s, generated in {time.perf_counter() - loaded:.1f} s; wrote "
          + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
