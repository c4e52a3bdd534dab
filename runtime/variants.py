"""Names of the synthetic checkpoint variants and where they are written, without torch: the command lines
list them in `--help`, validate `--synthetic` and find a written one before importing anything heavy.
`runtime.checkpoint` defines their configs."""

from pathlib import Path

VARIANT_NAMES = ("tiny-t2i", "tiny-t2v", "d48w768-sdxl1024", "d48w1024-sdxl1024", "d48w1536-sdxl1024", "d48w1024-osp480")
SYNTHETIC_ROOT = Path("checkpoints/synthetic")  # relative: the commands run from the repository root
