"""Build the compiled graphs of a NOVA checkpoint: ONNX graphs, checked in ONNX Runtime, and TensorRT
engines where TensorRT is installed. Run from the repository root:

    python export/build_engines.py --precision fp16
    python export/build_engines.py --checkpoint /models/nova-d48w1024-osp480 --latent-capacity 9

The output folder holds one `<graph>.onnx` + `<graph>.onnx.data` per graph (+ `<graph>.plan` for
TensorRT) and `manifest.json`, which records a content key per graph. Running the same command again
rebuilds only what changed (weights, code, profile, precision, toolchain, TensorRT version, GPU) and
anything whose files were modified.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.cli import HelpFormatter, add_version, positive_int  # noqa: E402  (torch-free: --help answers at once)
from runtime.options import OPTIONS  # noqa: E402
from runtime.variants import VARIANT_NAMES  # noqa: E402

DEFAULT_SYNTHETIC = "tiny-t2i"


def _override(text: str) -> tuple[str, str]:
    name, sep, precision = text.partition("=")
    if not sep or not name or not precision:
        raise argparse.ArgumentTypeError(f"expected GRAPH=PRECISION (e.g. vae_decoder=bf16), got {text!r}")
    return name, precision


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python export/build_engines.py",
        description="Export a NOVA checkpoint as separate graphs (text encoder, temporal prefill/step, spatial, "
                    "denoise, place, the unrolled denoise loop, VAE decoder/encoder), check each against its "
                    "PyTorch module in ONNX Runtime, and build TensorRT engines where TensorRT is installed. "
                    "Unchanged graphs are reused.",
        epilog="Every static shape follows from the build profile; a request outside it (more prompts, a longer "
               "video, fewer mask steps) is refused by the runner. See engines/README.md for the artifacts, the "
               "manifest and the precision policy.",
        formatter_class=HelpFormatter)
    add_version(p)
    source = p.add_argument_group("model").add_mutually_exclusive_group()
    source.add_argument("--checkpoint", metavar="DIR", help="an official or synthetic NOVA checkpoint folder")
    source.add_argument("--synthetic", metavar="VARIANT", choices=VARIANT_NAMES,
                        help="a synthetic random-weight variant (written to checkpoints/synthetic/VARIANT on first use); "
                             f"one of {', '.join(VARIANT_NAMES)}. Default when no --checkpoint: {DEFAULT_SYNTHETIC}")
    out = p.add_argument_group("output")
    out.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp16",
                     help="matrix precision; per-graph exceptions follow the precision policy (engines/README.md)")
    out.add_argument("--component-precision", metavar="GRAPH=PREC", type=_override, action="append", default=[],
                     help="override one graph's precision, e.g. vae_decoder=bf16 (repeatable)")
    out.add_argument("--backend", choices=("auto", "tensorrt", "onnxruntime"), default="auto",
                     help="auto: TensorRT engines if TensorRT is installed, else ONNX Runtime artifacts")
    out.add_argument("--out", metavar="DIR", type=Path,
                     help="output folder (default: engines/<checkpoint name>-<precision>)")
    prof = p.add_argument_group("build profile (fixes every static shape)")
    prof.add_argument("--prompts", type=positive_int, default=1, help="prompts per call")
    prof.add_argument("--images-per-prompt", type=positive_int, default=1, help="images (or videos) per prompt")
    prof.add_argument("--no-cfg", action="store_true",
                      help="build without the classifier-free-guidance batch (requests must use guidance_scale <= 1)")
    prof.add_argument("--latent-capacity", "--max-latent-length", type=positive_int, default=None, metavar="N",
                      help="KV-cache capacity: the longest max_latent_length a request may use (default: 1 for image "
                           "checkpoints, 9 for video checkpoints)")
    prof.add_argument("--min-mask-steps", type=positive_int, default=OPTIONS["num_inference_steps"].default,
                      help="fewest num_inference_steps a request may use; sets the tokens per mask step")
    prof.add_argument("--max-tokens-per-step", type=positive_int, default=None,
                      help="tokens per mask step, overriding the value derived from --min-mask-steps")
    prof.add_argument("--loop-diffusion-steps", "--diffusion-steps", type=positive_int, metavar="S",
                      default=OPTIONS["num_diffusion_steps"].default,
                      help="the num_diffusion_steps whose whole diffusion loop is one graph (one launch per mask "
                           "step); requests with another num_diffusion_steps run one launch per diffusion step")
    prof.add_argument("--no-image-to-video", action="store_true", help="video checkpoints: skip the VAE encoder")
    prof.add_argument("--third-guidance-pass", action="store_true",
                      help="serves image_guidance_scale and spatiotemporal_guidance_scale; costs a third more "
                           "transformer compute (needs CFG)")
    prof.add_argument("--guidance-renorm", action="store_true",
                      help="serve guidance_renorm: denoise_loop carries the whole token grid (its norms run over every "
                           "token), for requests at the built --loop-diffusion-steps (needs CFG)")
    run = p.add_argument_group("build")
    run.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo",
                     help="torch.onnx exporter (measured in engines/README.md)")
    run.add_argument("--only", metavar="GRAPH", action="append", help="build only this graph (repeatable)")
    run.add_argument("--force", action="store_true", help="rebuild even when the content key is unchanged")
    run.add_argument("--skip-validation", action="store_true",
                     help="do not run the graphs in ONNX Runtime after export (recorded in the manifest)")
    run.add_argument("--validate-frames", type=positive_int, default=3,
                     help="frames of the multi-frame KV-cache check of the temporal graphs")
    run.add_argument("--threads", type=positive_int, default=1, help="ONNX Runtime threads for validation")
    run.add_argument("--workspace-gib", type=float, default=8.0, help="TensorRT workspace memory-pool limit")
    run.add_argument("--optimization-level", type=int, choices=range(6), default=3,
                     help="TensorRT builder optimization level")
    run.add_argument("--no-progress", action="store_true",
                     help="no progress bars (they are off anyway when stderr is not a terminal: one line per graph)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)  # before the heavy imports: --help and argument errors answer at once
    try:
        return _build(args)
    except KeyboardInterrupt:  # a re-run reuses every graph finished before the interrupt
        print("interrupted", file=sys.stderr)
        return 130


def _build(args: argparse.Namespace) -> int:
    if args.backend == "tensorrt":  # before torch's import (seconds): a machine without TensorRT answers at once
        from export.tensorrt_build import TensorRTUnavailable, require

        try:
            require()
        except TensorRTUnavailable as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    from export.build import BuildError, BuildOptions, build, format_table
    from export.manifest import ManifestError
    from export.onnx_export import ExportError
    from runtime.checkpoint import CheckpointError, resolve_checkpoint
    from runtime.graphs.profile import BuildProfile

    try:
        import torch

        torch.set_num_threads(max(1, args.threads))
        folder = resolve_checkpoint(args.checkpoint, args.synthetic or DEFAULT_SYNTHETIC)
        out = args.out or Path("engines") / f"{Path(folder).resolve().name}-{args.precision}"
        profile = BuildProfile(prompts=args.prompts, images_per_prompt=args.images_per_prompt, cfg=not args.no_cfg,
                               max_latent_length=args.latent_capacity, min_mask_steps=args.min_mask_steps,
                               max_tokens_per_step=args.max_tokens_per_step, diffusion_steps=args.loop_diffusion_steps,
                               image_to_video=not args.no_image_to_video, third_pass=args.third_guidance_pass,
                               guidance_renorm=args.guidance_renorm)
        options = BuildOptions(
            checkpoint=Path(folder), out=out, precision=args.precision, backend=args.backend, profile=profile,
            overrides=dict(args.component_precision), exporter=args.exporter, validate=not args.skip_validation,
            validate_frames=args.validate_frames, threads=args.threads, only=tuple(args.only) if args.only else None,
            force=args.force, workspace_gib=args.workspace_gib, opt_level=args.optimization_level,
            progress=not args.no_progress)
        print(f"building {options.checkpoint} -> {out} ({args.precision})", flush=True)
        rows = build(options)
    except (BuildError, CheckpointError, ManifestError, ExportError, ValueError, FileExistsError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print()
    print(format_table(rows))
    rebuilt = sum(r.status == "rebuilt" for r in rows)
    print(f"\n{len(rows)} components in {out}: {rebuilt} rebuilt, {sum(r.status == 'reused' for r in rows)} reused; "
          f"manifest: {out / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
