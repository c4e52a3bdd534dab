"""Names of the synthetic checkpoint variants, without torch: the command lines list them in `--help`
and validate `--synthetic` before importing anything heavy. `runtime.checkpoint` defines their configs."""

VARIANT_NAMES = ("tiny-t2i", "tiny-t2v", "d48w768-sdxl1024", "d48w1024-sdxl1024", "d48w1536-sdxl1024", "d48w1024-osp480")
