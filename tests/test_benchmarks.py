"""Benchmarks: the FLOP formulas against NOVA_SPEC §6, and a smoke run of each script on tiny-t2i.

The benchmarks themselves never run in CI (minutes to hours); these runs use one repetition and a
few steps so the scripts and their reports cannot rot.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import common, flops
from benchmarks.parity import sample_indices
from benchmarks.targets import TargetSpec
from runtime.model.config import NOVAConfig

ROOT = Path(__file__).resolve().parents[1]
PHI2 = {"hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 32}
SDXL_VAE = {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
            "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
            "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "act_fn": "silu",
            "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 0.13025}


def released(width: int) -> NOVAConfig:
    """NOVA_SPEC §1.1: the sdxl1024 configs (all widths) and osp480 (width 0 here)."""
    if width == 0:
        return NOVAConfig.from_dict({"image_dim": 4, "image_size": [480, 768], "image_stride": 8, "text_token_dim": 2560,
                                     "text_token_len": 256, "video_base_size": [16, 15, 24], "image_base_size": [30, 48],
                                     "video_mixer_rank": 24, "arch": ["vit_d16w1024", "vit_d32w1024", "mlp_d3w1280"]})
    return NOVAConfig.from_dict({"image_dim": 4, "image_size": 1024, "image_stride": 8, "text_token_dim": 2560,
                                 "text_token_len": 256, "video_base_size": [1, 32, 32], "image_base_size": [64, 64],
                                 "arch": [f"vit_d16w{width}", f"vit_d32w{width}", f"mlp_d6w{width}"]})


def close(value: float, expected: float, rel: float = 0.01) -> bool:
    return abs(value - expected) <= rel * expected


# NOVA_SPEC §6.1, CFG batch of 2 counted: (width, temporal t=0, spatial k=0, spatial k=1000, MLP per row)
PER_CALL = [(768, 0.74e12, 5.46e12, 6.22e12, 40.1e6), (1024, 1.25e12, 8.52e12, 9.73e12, 71.3e6),
            (1536, 2.64e12, 16.49e12, 18.90e12, 160.5e6), (0, 0.55e12, 2.18e12, 3.21e12, 61.6e6)]


@pytest.mark.parametrize("width, temporal, spatial0, spatial1000, mlp_row", PER_CALL)
def test_per_call_flops_match_the_spec(width, temporal, spatial0, spatial1000, mlp_row):
    config = released(width)
    assert close(flops.temporal_frame(config, 0, rows=2), temporal)
    assert close(flops.spatial_step(config, 0, rows=2), spatial0)
    assert close(flops.spatial_step(config, 1000, rows=2), spatial1000)
    assert close(flops.diffusion_token(config), mlp_row)


def test_the_spec_arithmetic_example_and_the_video_and_text_costs():
    # d48w1024, one mask step at k = 0: decoder half 3.78e12 + encoder half 4.8e11 per sequence
    assert close(16 * flops.block(1024, 5120), 3.78e12) and close(16 * flops.block(1024, 1024), 4.8e11)
    osp = released(0)
    steps = [flops.temporal_frame(osp, t, rows=2) for t in range(9)]
    assert close(steps[1], 0.34e12, 0.02) and close(steps[8], 0.45e12, 0.02)
    assert close(sum(steps), 3.71e12)
    assert close(flops.phi(PHI2, 256, rows=2), 2.62e12)


def test_request_totals_match_the_spec():
    # §6.2: image encoder over the K = 64 schedule; video: 9 latents of osp480; VAEs counted on meta
    for width, expected in ((768, 433.8e12), (1024, 676.3e12), (1536, 1308.2e12)):
        total = flops.request(released(width), PHI2, SDXL_VAE, text_rows=2)
        assert close(total["useful"]["spatial"], expected), width
        assert close(total["useful"]["text"], 2.62e12) and close(total["useful"]["vae"], 10.47e12)
        # the spec's diffusion totals are 2-4 % above its own per-row figure times the token count
        assert close(total["useful"]["denoise"], {768: 8.5e12, 1024: 15.0e12, 1536: 33.5e12}[width], 0.05)
        # known-token slots in buckets of N / 8 (+4 %, the table of engines/README.md), less the last block's
        # queries of the tokens nobody reads (-4 %)
        assert total["useful"]["spatial"] < total["executed"]["spatial"] < 1.01 * total["useful"]["spatial"]
    from runtime.model.vae_opensora import OSP480_VAE_CONFIG

    video = flops.request(released(0), PHI2, OSP480_VAE_CONFIG, frames=9, text_rows=2)
    assert close(video["useful"]["spatial"], 1536e12) and close(video["useful"]["temporal"], 3.71e12)
    assert close(video["useful"]["vae"], 266.3e12) and close(video["executed_per_graph_call"]["vae_decoder"], 133.2e12)
    assert close(sum(video["useful"].values()), 1.85e15)


def test_helpers():
    assert common.percentile([3.0, 1.0, 2.0], 50) == 2.0 and common.percentile([1.0, 2.0], 90) == pytest.approx(1.9)
    assert sample_indices(1600, 3) == {0, 800, 1599} and sample_indices(1, 3) == {0} and sample_indices(0, 3) == set()
    assert TargetSpec.parse("onnxruntime").label == "onnxruntime:fp32"
    with pytest.raises(ValueError, match="unknown target kind"):
        TargetSpec.parse("tensorflow:fp32")


# ---------------------------------------------------------------------------------------------------
# Smoke runs of the scripts (one repetition, a few steps, the fast TorchScript exporter)
# ---------------------------------------------------------------------------------------------------
SMOKE = ["--steps", "4", "--diffusion-steps", "2", "--exporter", "torchscript", "--threads", "1"]


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def check_png(path: Path) -> None:
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 800 and image.height >= 200
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or []) > 5  # drawn, not blank


def test_latency_script_writes_real_reports(tiny_t2i, tmp_path):
    # the torch runner target is smoked by the gpu.sh dry run (each target is a process importing torch: ~7 s)
    run_script("latency.py", "--checkpoint", str(tiny_t2i), "--targets", "reference:fp32,onnxruntime:fp32",
               "--repetitions", "1", "--warmup", "1", "--engines-root", str(tmp_path / "engines"),
               "--out", str(tmp_path / "out"), *SMOKE)
    report = json.loads((tmp_path / "out" / "latency-tiny-t2i.json").read_text())
    env = report["environment"]
    assert env["device"] == "cpu" and env["versions"]["torch"] and env["command"].count("latency.py") == 1
    assert env["date"] and env["git_commit"]
    assert [t["target"] for t in report["targets"]] == ["reference:fp32", "onnxruntime:fp32"]
    assert report["matmul_rate"]["fp32"]["flops_per_s"] > 1e8  # a measured rate, not a placeholder
    # FLOPs of this request: the formulas of benchmarks/flops.py (checked against NOVA_SPEC above)
    expected = flops.for_checkpoint(tiny_t2i, steps=4, diffusion_steps=2, frames=1, cfg=True,
                                    max_tokens_per_step=report["settings"]["build_profile"]["max_tokens_per_step"])
    assert report["flops"]["useful"] == pytest.approx(expected["useful"])
    ceiling = report["matmul_rate"]["fp32"]["flops_per_s"]
    reference_e2e = report["targets"][0]["e2e"]["median"]
    for target in report["targets"]:
        assert len(target["e2e_seconds"]) == 1 and len(target["warmup_seconds"]) == 1
        assert target["e2e"]["median"] == target["e2e_seconds"][0]  # one repetition: its own median
        stages = {s: v["median"] for s, v in target["stages"].items()}
        assert all(stages[s] > 0 for s in ("text", "temporal", "spatial", "denoise", "vae"))  # every stage timed
        assert sum(stages.values()) == pytest.approx(target["e2e"]["median"], rel=1e-6)
        assert target["memory"]["peak_rss_bytes"] > 50 * 2**20
        assert target["speedup_vs_reference"]["e2e"] == pytest.approx(reference_e2e / target["e2e"]["median"])
        assert target["checks"]["pixels_shape"] == [1, 64, 64, 3]
        assert target["throughput"]["spatial"]["useful_flops_per_s"] == pytest.approx(
            report["flops"]["useful"]["spatial"] / stages["spatial"])
    runner = report["targets"][1]
    # built for the request's 2 diffusion steps: one denoise_loop launch per mask step
    assert runner["graph_calls"]["denoise_loop"]["calls"] == runner["graph_calls"]["spatial"]["calls"] == 4
    assert "denoise" not in runner["graph_calls"]
    loop = runner["overhead"]["denoise_loop"]
    assert loop["compute_floor_seconds"] == pytest.approx(loop["flops_per_call"] / ceiling)
    assert loop["above_floor_seconds"] == pytest.approx(loop["per_call_seconds"] - loop["compute_floor_seconds"])
    markdown = (tmp_path / "out" / "latency-tiny-t2i.md").read_text()
    assert "| onnxruntime:fp32 | " in markdown and "x |" in markdown and "nan" not in markdown.lower()
    check_png(tmp_path / "out" / "latency-tiny-t2i.png")


def test_parity_script_writes_real_reports(tiny_t2i, t2i_engines, tmp_path):
    """On the session's engine folder, given with --engines (the latency smoke covers the scripts' own builds):
    its build profile serves 8 mask x 4 diffusion steps in one denoise_loop launch per mask step. Run in this
    process (its targets share one, unlike latency.py's); the script as a script answers --help."""
    from benchmarks import parity

    assert "--targets" in run_script("parity.py", "--help").stdout
    assert parity.main(["--checkpoint", str(tiny_t2i), "--targets", "torch:fp32,onnxruntime:fp32",
                        "--engines", f"fp32={t2i_engines}", "--out", str(tmp_path / "out"),
                        "--steps", "8", "--diffusion-steps", "4", "--threads", "1"]) == 0
    report = json.loads((tmp_path / "out" / "parity-tiny-t2i.json").read_text())
    assert report["environment"]["versions"]["onnxruntime"] and report["self_drift"]["latents"]["max_abs"] < 1e-3
    torch_fp32, ort_fp32 = report["targets"]
    graphs = {g["graph"] for g in torch_fp32["graphs"]}
    # built for the request's 2 diffusion steps: denoise_loop, not denoise and place
    assert graphs == {"text_encoder", "temporal_prefill", "spatial", "denoise_loop", "vae_decoder"}
    assert all(g["max_abs"] == 0 for g in torch_fp32["graphs"])  # the recorded modules against themselves
    rounding = {g["graph"]: g for g in report["graph_rounding_fp32_vs_fp64"]}
    assert 0 < rounding["spatial"]["max_abs"] < 1e-4 and rounding["denoise_loop"]["max_abs"] < 1e-4
    assert all(g["finite"] and g["cosine"] > 0.9999 for g in ort_fp32["graphs"])
    assert max(g["max_abs"] for g in ort_fp32["graphs"] if g["dtype"] == "float32") < 1e-3
    for target in (torch_fp32, ort_fp32):
        e2e = target["end_to_end"]
        assert e2e["latents"]["max_abs"] < 1e-3 and len(e2e["per_frame_max_abs"]) == 1
        assert e2e["pixels"]["psnr_db"] == "inf" or e2e["pixels"]["psnr_db"] > 40
    markdown = (tmp_path / "out" / "parity-tiny-t2i.md").read_text()
    assert "| onnxruntime:fp32 | spatial | z_selected |" in markdown and "self-drift" in markdown
    assert "| torch:fp32 vs float64 (rounding scale) | spatial |" in markdown
    check_png(tmp_path / "out" / "parity-tiny-t2i.png")


def test_profile_script_writes_real_reports(t2i_engines, tmp_path):
    """On the session's engine folder, in this process (the --compile column is run by the committed reports:
    inductor's compilation alone would take tens of seconds here)."""
    from benchmarks import profile_graphs

    assert profile_graphs.main(["--engines", str(t2i_engines), "--graphs", "spatial,denoise_loop", "--runs", "2",
                                "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "profile-tiny-t2i.json").read_text())
    assert report["threads"] == 1 and report["environment"]["git_commit"]
    for graph in ("spatial", "denoise_loop"):
        runs = report["graphs"][graph]
        assert set(runs) == {"onnxruntime", "torch"}
        for run in runs.values():
            assert run["wall_per_call_s"] > 0 and run["by_category_s"]["matmul"] > 0
            assert sum(run["by_category_s"].values()) == pytest.approx(sum(run["per_op_s"].values()))
    assert "attention (sdpa/softmax/mask)" in report["graphs"]["spatial"]["torch"]["by_category_s"]
    markdown = (tmp_path / "profile-tiny-t2i.md").read_text()
    assert "## denoise_loop" in markdown and "| matmul | " in markdown and "nan" not in markdown.lower()


def test_gpu_script_dry_run_on_cpu(tmp_path, tiny_t2v):
    """benchmarks/gpu.sh cannot run here (no GPU): its CPU dry-run mode drives the same steps on tiny models.
    The session's tiny-t2v stands in for the script's synthesis (the `synth` command is tested with the checkpoints)."""
    import shutil

    shutil.copytree(tiny_t2v, tmp_path / "data" / "tiny-t2v")
    (tmp_path / "data" / "tiny-t2v.checkpoint.ready").touch()
    env = {"DEVICE": "cpu", "T2I_VARIANT": "tiny-t2i", "T2V_VARIANT": "tiny-t2v", "STEPS": "4", "DIFFUSION_STEPS": "2",
           "FRAMES": "5", "WARMUP": "0", "NOVA_BENCH_DATA": str(tmp_path / "data"), "RESULTS": str(tmp_path / "out"),
           "PYTHON": sys.executable}  # the video targets on a CPU: reference:fp32,torch:fp32, one run each
    import os

    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "t2v-latency"], cwd=ROOT,
                            capture_output=True, text=True, timeout=240, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "out" / "latency-tiny-t2v.json").read_text())
    assert report["settings"]["max_latent_length"] == 5 and report["settings"]["num_inference_steps"] == 4
    assert [t["checks"]["pixels_shape"] for t in report["targets"]] == [[1, 17, 64, 96, 3]] * 2
    assert report["targets"][1]["graph_calls"]["temporal_step"]["calls"] == 4
    check_png(tmp_path / "out" / "latency-tiny-t2v.png")


def test_official_target_arguments(tmp_path):
    from benchmarks.latency import target_specs

    labels = lambda specs: [s.label for s in specs]  # noqa: E731
    assert labels(target_specs(None, "cpu", None)) == ["reference:fp32", "torch:fp32", "onnxruntime:fp32"]
    with pytest.raises(ValueError, match="needs --official PATH"):
        target_specs("official:fp32,torch:fp32", "cpu", None)
    with pytest.raises(ValueError, match="is not a checkout of baaivision/NOVA"):
        target_specs(None, "cpu", tmp_path)
    (tmp_path / "diffnext" / "pipelines" / "nova").mkdir(parents=True)  # the layout the check looks for
    assert labels(target_specs(None, "cpu", tmp_path)) == ["official:fp32", "reference:fp32", "torch:fp32",
                                                           "onnxruntime:fp32"]
    assert labels(target_specs("torch:fp32,official:fp32", "cpu", tmp_path)) == ["torch:fp32", "official:fp32"]
    assert labels(target_specs(None, "cuda", tmp_path))[0] == "official:fp16"


def test_each_target_is_compared_with_the_official_pipeline_of_its_precision():
    from benchmarks.latency import official_baseline

    results = [{"target": t, "kind": t.split(":")[0], "precision": t.split(":")[1]}
               for t in ("official:fp32", "official:bf16", "inductor:bf16", "torch:fp16")]
    assert official_baseline(results, "bf16")["target"] == "official:bf16"
    assert official_baseline(results, "fp32")["target"] == "official:fp32"
    assert official_baseline(results, "fp16")["target"] == "official:fp32"  # none of its precision: the first
    assert official_baseline(results[2:], "bf16") is None
    assert TargetSpec.parse("inductor:bf16").kind == "inductor"  # the torch backend with torch.compile


@pytest.mark.skipif(not os.environ.get("NOVA_OFFICIAL"), reason="NOVA_OFFICIAL names no checkout of the official code "
                                                                 "(baaivision/NOVA; CI has none)")
def test_official_target_runs_beside_the_reference(tiny_t2i, tmp_path):
    run_script("latency.py", "--checkpoint", str(tiny_t2i), "--official", os.environ["NOVA_OFFICIAL"],
               "--targets", "official:fp32,reference:fp32", "--repetitions", "1", "--warmup", "0",
               "--out", str(tmp_path), *SMOKE)
    report = json.loads((tmp_path / "latency-tiny-t2i.json").read_text())
    official, reference = report["targets"]
    assert official["backend"] == "NOVAPipeline" and official["speedup_vs_official"] == 1.0
    assert reference["pixels_vs_official"]["max_abs_levels"] <= 1  # same seed, same draws, same algorithm
    assert reference["speedup_vs_official"] == pytest.approx(official["e2e"]["median"] / reference["e2e"]["median"])
