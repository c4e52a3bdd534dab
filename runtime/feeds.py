"""The host arrays the runner feeds its graphs, made with numpy alone: text rows per guidance block, every
mask step's index inputs, the sampler inputs, and noise rows cut from whole-canvas draws.

Rows follow the built batch: a request smaller than the build fills the remaining rows by repeating its
last one (`pad_rows`; the padded rows are computed and discarded).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from runtime.graphs.profile import NO_CLIP, Geometry
from runtime.guidance_plan import GuidancePlan
from runtime.request import Request
from runtime.schedules import SamplerTable

TextRow = tuple[np.ndarray, int]  # features [text_len, text_dim] float32, real token count


def text_rows(request: Request, positive: list[TextRow], negative: list[TextRow] | None,
              g: Geometry) -> dict[str, np.ndarray]:
    """text_hidden [M, 256, Dt], text_lengths [M] (+ motion_flow [M]): per guidance block of the build
    (`GuidancePlan.text_blocks`) the prompts' or the negatives' rows (prompt-major, repeated per image,
    padded to the built batch). Without negatives the unconditional rows are empty prompts (null features)."""
    empty = (np.zeros((g.text_len, g.text_dim), np.float32), 0)
    per_image = {"cond": positive, "uncond": negative or [empty] * request.num_prompts}
    rows = [row for block in request.guidance.text_blocks(g.blocks)
            for row in pad_rows([r for r in per_image[block] for _ in range(request.num_images_per_prompt)], g.batch)]
    out = {"text_hidden": np.stack([r[0] for r in rows]), "text_lengths": np.array([r[1] for r in rows], np.int64)}
    if g.has_motion:
        out["motion_flow"] = np.full((g.model_batch,), request.motion_flow, np.float32)
    return out


def embed_row(embeds, g: Geometry) -> TextRow:
    """A given prompt embedding [tokens, Dt] (array or tensor) -> a text row, cut or zero-padded to text_len."""
    values = to_numpy(embeds).astype(np.float32)[: g.text_len]
    row = np.zeros((g.text_len, g.text_dim), np.float32)
    row[: len(values)] = values
    return row, len(values)


def guidance_rows(plan: GuidancePlan, g: Geometry) -> dict[str, np.ndarray]:
    """The temporal graphs' raw_bos [M] of a three-block build (two-block builds have no such input)."""
    return {"raw_bos": plan.raw_bos(g.blocks, g.batch)} if g.blocks == 3 else {}


@dataclasses.dataclass(frozen=True)
class MaskStepIndices:
    """One mask step's index inputs (host arrays): the spatial graph's and the placing's."""

    selected: np.ndarray  # [B_built, n_max] token ids: this step's, then the next ones of the order (invalid)
    known_ids: np.ndarray  # [B_built, known slots] the tokens generated before this step
    known_count: np.ndarray  # [1] int64
    valid: np.ndarray  # [B_built, n_max] bool: which of `selected` this step predicts


def mask_step_indices(order: np.ndarray, schedule: list[int], g: Geometry) -> list[MaskStepIndices]:
    """Every mask step's index inputs from the token order [B_built, N] (fixed for the request)."""
    steps, position = [], 0
    for count in schedule:
        # Distinct ids per row: this step's tokens, then the next ones of the order (marked invalid).
        selected = np.take(order, (position + np.arange(g.max_tokens_per_step)) % g.num_tokens, axis=1)
        steps.append(MaskStepIndices(
            selected=selected, known_ids=np.ascontiguousarray(order[:, :g.known_slots(position)]),
            known_count=np.array([position], np.int64),
            valid=np.ascontiguousarray(np.broadcast_to(np.arange(g.max_tokens_per_step) < count, selected.shape))))
        position += count
    return steps


def sampler_constants(plan: GuidancePlan, sampler: SamplerTable, g: Geometry, whole_grid: bool) -> dict[str, np.ndarray]:
    """The diffusion graphs' inputs that stay the same at every diffusion step: clip_range, and on a three-block
    build third_scale and image_guidance (a scale of 0 with the spatiotemporal form is plain CFG, exactly),
    and renorm for the whole-grid loop."""
    out = {"clip_range": np.array([sampler.clip_range if sampler.clip_range is not None else NO_CLIP], np.float32)}
    if g.blocks == 3:
        out |= {"third_scale": np.array([plan.third_scale], np.float32),
                "image_guidance": np.array([plan.image_scale > 0])}
    if whole_grid:
        out["renorm"] = np.array([plan.renorm], np.float32)
    return out


def pad_rows(rows, count: int):
    """Fill a batch built for `count` rows by repeating the last row (padded rows are discarded)."""
    if isinstance(rows, np.ndarray):
        return np.concatenate([rows, np.repeat(rows[-1:], count - len(rows), axis=0)]) if len(rows) < count else rows
    return list(rows) + [rows[-1]] * (count - len(rows))


def grid_rows(noise, g: Geometry) -> np.ndarray:
    """Noise drawn for the whole canvas [B, C, h, w] -> every token's values [B_built, N, 16]."""
    return pad_rows(_patchify(to_numpy(noise).astype(np.float32), g.patch), g.batch)


def gather_rows(noise, selected: np.ndarray, g: Geometry) -> np.ndarray:
    """Noise drawn for the whole canvas [B, C, h, w] -> the selected tokens' values [B_built, n_max, 16]."""
    return np.take_along_axis(grid_rows(noise, g), selected[..., None], axis=1)


def _patchify(x: np.ndarray, patch: int) -> np.ndarray:
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.transpose(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def to_numpy(value) -> np.ndarray:
    """An array or a (CPU or device, any dtype) tensor -> a numpy array, without importing torch."""
    if not hasattr(value, "cpu"):
        return np.asarray(value)
    value = value.cpu()
    return (value.float() if str(value.dtype) == "torch.bfloat16" else value).numpy()
