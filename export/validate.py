"""Parity of an exported graph with its torch module, in ONNX Runtime, on fresh random inputs.

Per output: max abs error, mean abs error, cosine similarity (float outputs) and the largest
reference magnitude. A graph passes when, for every output,

    float:  max_abs <= atol + rtol * max|reference|   and   cosine >= min_cosine
    uint8:  max_abs <= uint8_max                      and   share of differing values <= uint8_share

with the tolerances of the graph's compute precision (`TOLERANCES`). Dynamic dims are checked at
their min, opt and max (ENGINEERING.md §5: NaNs at untested sizes). The temporal encoder is also
checked across several frames with the cache carried between calls (`temporal_sequence`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import numpy as np
import torch

from runtime.graphs.common import fp32_islands
from runtime.graphs.contract import GraphSpec, run_module
from runtime.graphs.profile import frame_position


@dataclasses.dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float
    min_cosine: float
    uint8_max: int
    uint8_share: float


TOLERANCES = {
    "fp32": Tolerance(rtol=1e-4, atol=1e-5, min_cosine=0.99999, uint8_max=1, uint8_share=0.01),
    "fp16": Tolerance(rtol=2e-2, atol=2e-3, min_cosine=0.999, uint8_max=2, uint8_share=0.3),
    "bf16": Tolerance(rtol=8e-2, atol=1e-2, min_cosine=0.99, uint8_max=4, uint8_share=0.6),
}


class ValidationError(RuntimeError):
    """An exported graph disagrees with its torch module beyond the tolerance."""


class NotRunnable(RuntimeError):
    """ONNX Runtime (this build, this provider) cannot run the graph (e.g. bf16 on the CPU provider)."""


def ort_session(path: str | os.PathLike, threads: int = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # fp16 graphs on CPU log every node it cannot constant-fold
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # ORT raises its own exception types
        message = str(error)
        missing = re.search(r"implementation for (\w+)\(", message) or re.search(r"of operator \((\w+)\)", message)
        if missing:
            raise NotRunnable(f"ONNX Runtime {ort.__version__}'s CPU provider has no {missing.group(1)} kernel "
                              "for this graph's dtypes") from None
        raise


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """numpy has no bfloat16: such tensors come back as float32 (exact)."""
    tensor = tensor.detach().cpu()
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()


def compare(actual: np.ndarray, expected: np.ndarray) -> dict[str, float]:
    a, e = actual.astype(np.float64).ravel(), expected.astype(np.float64).ravel()
    diff = np.abs(a - e)
    denom = np.linalg.norm(a) * np.linalg.norm(e)
    cosine = float(a @ e / denom) if denom > 0 else (1.0 if np.array_equal(a, e) else 0.0)
    return {"max_abs": float(diff.max(initial=0.0)), "mean_abs": float(diff.mean()) if diff.size else 0.0,
            "cosine": cosine, "ref_max": float(np.abs(e).max(initial=0.0)),
            "differing_share": float((diff > 0).mean()) if diff.size else 0.0,
            "finite": bool(np.isfinite(a).all())}


def judge(name: str, dtype: str, error: dict[str, Any], tol: Tolerance) -> str | None:
    """None if within tolerance, else why not.

    16-bit graphs carry two more comparisons (`vs_fp32`: the graph against the fp32 module;
    `module_vs_fp32`: the 16-bit torch module against the fp32 module). Two 16-bit computations round
    differently, and over 16-32 post-norm layers the torch CPU fp16 path drifts further from fp32 than
    ONNX Runtime does (measured at full size). So a 16-bit graph outside the fixed tolerance still passes
    when it is at least as close to fp32 as its own torch module is (x1.5 + atol), with the cosine bound.
    """
    if not error["finite"]:
        return f"{name}: non-finite values"
    if dtype in ("uint8", "bool", "int64"):
        if error["max_abs"] <= tol.uint8_max and error["differing_share"] <= tol.uint8_share:
            return None
        anchored = error.get("vs_fp32")
        if anchored and anchored["max_abs"] <= max(tol.uint8_max, 1.5 * error["module_vs_fp32"]["max_abs"]):
            return None
        return (f"{name}: max abs {error['max_abs']:g} (allowed {tol.uint8_max}), "
                f"{100 * error['differing_share']:.2f}% differ (allowed {100 * tol.uint8_share:g}%)")
    limit = tol.atol + tol.rtol * error["ref_max"]
    if error["max_abs"] <= limit and error["cosine"] >= tol.min_cosine:
        return None
    anchored = error.get("vs_fp32")
    if anchored:
        anchor_limit = tol.atol + 1.5 * error["module_vs_fp32"]["max_abs"]
        if anchored["max_abs"] <= anchor_limit and anchored["cosine"] >= tol.min_cosine:
            return None
        return (f"{name}: max abs {error['max_abs']:.3g} vs the {tol_name(tol)} module (allowed {limit:.3g}) and "
                f"{anchored['max_abs']:.3g} vs the fp32 module (allowed {anchor_limit:.3g}: 1.5x the torch module's "
                f"own), cosine {min(error['cosine'], anchored['cosine']):.6f} (allowed >= {tol.min_cosine})")
    return (f"{name}: max abs {error['max_abs']:.3g} (allowed {limit:.3g}), cosine {error['cosine']:.6f} "
            f"(allowed >= {tol.min_cosine})")


def tol_name(tol: Tolerance) -> str:
    return next((k for k, v in TOLERANCES.items() if v == tol), "same-precision")


def _merge(worst: dict[str, dict], name: str, error: dict[str, Any]) -> None:
    if name not in worst:
        worst[name] = {k: dict(v) if isinstance(v, dict) else v for k, v in error.items()}
        return
    w = worst[name]
    for key in ("max_abs", "mean_abs", "ref_max", "differing_share"):
        w[key] = max(w[key], error[key])
    w["cosine"] = min(w["cosine"], error["cosine"])
    w["finite"] = w["finite"] and error["finite"]
    for sub in ("vs_fp32", "module_vs_fp32"):
        if sub in error:
            if sub in w:
                _merge(w, sub, error[sub])
            else:
                w[sub] = dict(error[sub])


def reference_cases(spec: GraphSpec, module: torch.nn.Module, seed: int = 1,
                    points: tuple[str, ...] = ("min", "opt", "max"), fp32_module: torch.nn.Module | None = None,
                    fp32_spec: GraphSpec | None = None) -> list[dict[str, Any]]:
    """Fresh random inputs at each distinct size of the dynamic dims, with the torch module's outputs
    (and, for a 16-bit graph given its fp32 twin, the fp32 module's outputs on the same inputs)."""
    cases, sizes = [], []
    for point in points:
        dims = spec.dims_at(point)
        if dims in sizes:
            continue
        sizes.append(dims)
        inputs = spec.sample(dims, torch.Generator().manual_seed(seed + len(sizes)))
        expected = run_module(spec, module, inputs)
        case = {"dims": dims, "inputs": {k: to_numpy(v) for k, v in inputs.items()},
                "expected": {k: to_numpy(v) for k, v in expected.items()}}
        if fp32_module is not None:
            wide = {k: v.float() if v.is_floating_point() else v for k, v in inputs.items()}
            case["fp32"] = {k: to_numpy(v) for k, v in run_module(fp32_spec or spec, fp32_module, wide).items()}
        cases.append(case)
    return cases


def compare_cases(spec: GraphSpec, run, cases: list[dict[str, Any]], what: str = "ONNX Runtime") -> dict[str, Any]:
    """Run the graph on the cases (`run`: an ONNX Runtime session, or a callable taking the named numpy
    inputs and returning the outputs in declaration order); raise ValidationError beyond tolerance."""
    import onnxruntime as ort

    call = run if callable(run) else (lambda feed: run.run([t.name for t in spec.outputs], feed))
    tol, worst = TOLERANCES[spec.precision], {}
    for case in cases:
        for t, actual in zip(spec.outputs, call(case["inputs"])):
            error = compare(actual, case["expected"][t.name])
            if "fp32" in case:
                error["vs_fp32"] = compare(actual, case["fp32"][t.name])
                error["module_vs_fp32"] = compare(case["expected"][t.name], case["fp32"][t.name])
            _merge(worst, t.name, error)
    problems = [p for t in spec.outputs if (p := judge(t.name, t.dtype, worst[t.name], tol))]
    report = {"provider": "CPUExecutionProvider" if what == "ONNX Runtime" else what, "onnxruntime": ort.__version__,
              "precision": spec.precision, "tolerance": dataclasses.asdict(tol), "sizes": [c["dims"] for c in cases],
              "outputs": worst, "passed": not problems}
    if problems:
        raise ValidationError(f"graph {spec.name!r} ({spec.precision}) disagrees with its torch module in {what}: "
                              + "; ".join(problems))
    return report


def validate_graph(spec: GraphSpec, module: torch.nn.Module, onnx_path: str | os.PathLike, seed: int = 1,
                   threads: int = 1, session=None, points: tuple[str, ...] = ("min", "opt", "max")) -> dict[str, Any]:
    """Run the ONNX graph and the torch module on the same fresh inputs (dynamic dims at min, opt and
    max); raise ValidationError beyond tolerance, NotRunnable if ONNX Runtime cannot run it.
    -> report (worst error per output)."""
    cases = reference_cases(spec, module, seed, points)
    return compare_cases(spec, session or ort_session(onnx_path, threads), cases)


# -------------------------------------------------------------------------------------------------
# Temporal encoder across frames
# -------------------------------------------------------------------------------------------------
def reference_temporal(model, geometry, text_hidden, text_lengths, motion_flow, prev_latents, num_frames: int,
                       dtype: torch.dtype, raw_bos: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The reference pipeline's temporal path (null-fill, condition, VideoPosEmbed, the growing
    `KVCache`, the mixer) for frames 0..len(prev_latents); `raw_bos` rows take the raw BOS token as
    `Guidance.stack` gives image guidance's block. -> indicator per frame."""
    from runtime.model.kv_cache import KVCache

    g = geometry
    with torch.no_grad(), fp32_islands(dtype):
        rows = [text_hidden[i, : int(text_lengths[i])] for i in range(text_hidden.shape[0])]
        features = model.text_embed.fill_null(rows)
        condition = model.condition(features, motion_flow if g.has_motion else None)
        time_embed = model.video_pos_embed(num_frames)
        cache = KVCache(g.video_depth, g.model_batch, g.num_heads, condition.shape[1] + num_frames * g.num_video_tokens,
                        g.head_dim, dtype)
        def dup(x: torch.Tensor) -> torch.Tensor:
            rows = torch.cat([x] * g.blocks)
            return rows if raw_bos is None else torch.where(raw_bos.view(-1, 1, 1), model.mask_embed.bos_token, rows)
        tokens = model.frame_tokens(None, time_embed[0], g.batch)
        anchor = model.temporal(dup(tokens), condition, cache)
        indicators = [anchor]
        for t, latent in enumerate(prev_latents, start=1):
            tokens = model.frame_tokens(latent.to(dtype), time_embed[t], g.batch)
            indicators.append(model.indicator(anchor, model.temporal(dup(tokens), None, cache)))
    return indicators


def temporal_sequence(prefill: GraphSpec, step: GraphSpec, run_prefill, run_step, model, geometry, frames: int,
                      seed: int = 5, fp32_model=None) -> dict[str, Any]:
    """Prefill + (frames - 1) steps with the cache carried between calls, against `reference_temporal`.

    `run_prefill` / `run_step` map named numpy inputs to a list of outputs in declaration order (an
    ONNX Runtime session's run, or the torch module). For 16-bit graphs, `fp32_model` (the fp32
    transformer) anchors the comparison as in `judge`. -> per-frame errors of the indicator; raises
    ValidationError beyond tolerance."""
    g = geometry
    gen = torch.Generator().manual_seed(seed)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[step.precision]
    inputs = prefill.sample({}, gen)
    latents = [torch.randn(g.batch, g.channels, *g.latent_size, generator=gen) for _ in range(frames - 1)]
    args = (inputs["text_hidden"], inputs["text_lengths"], inputs.get("motion_flow"), latents, frames)
    raw_bos = inputs.get("raw_bos")
    expected = reference_temporal(model, g, args[0].to(dtype), *args[1:], dtype, raw_bos)
    wide = reference_temporal(fp32_model, g, *args, torch.float32, raw_bos) \
        if fp32_model is not None and dtype != torch.float32 else None
    numpy_inputs = {k: to_numpy(v) for k, v in inputs.items()}
    numpy_inputs["frame_position"] = frame_position(0, frames, g.base_t)
    indicator, k_cache, v_cache = run_prefill(numpy_inputs)
    anchor, got = indicator, [indicator]
    for t, latent in enumerate(latents, start=1):
        feed = {"prev_latent": to_numpy(latent), "frame_position": frame_position(t, frames, g.base_t),
                "k_cache": k_cache, "v_cache": v_cache,
                "cache_length": np.array([g.condition_len + t * g.num_video_tokens], dtype=np.int64)}
        if any(i.name == "anchor" for i in step.inputs):
            feed["anchor"] = anchor
        if raw_bos is not None:
            feed["raw_bos"] = numpy_inputs["raw_bos"]
        indicator, k_cache, v_cache = run_step(feed)
        got.append(indicator)
    tol, errors = TOLERANCES[step.precision], []
    for t, (actual, reference) in enumerate(zip(got, expected)):
        error = compare(np.asarray(actual), to_numpy(reference))
        if wide is not None:
            error["vs_fp32"] = compare(np.asarray(actual), to_numpy(wide[t]))
            error["module_vs_fp32"] = compare(to_numpy(reference), to_numpy(wide[t]))
        errors.append(error)
    problems = [p for t, e in enumerate(errors) if (p := judge(f"indicator of frame {t}", "float", e, tol))]
    report = {"frames": frames, "indicator": errors, "passed": not problems}
    if problems:
        raise ValidationError("temporal prefill + step with the cache carried across frames disagree with the "
                              "reference KV-cache path: " + "; ".join(problems))
    return report
