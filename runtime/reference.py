"""Reference pipeline: a plain eager port of the official NOVA inference algorithm (NOVA_SPEC §5).

It is the parity baseline of every compiled backend. The loops are written out as the official
pipeline runs them:

    text -> for each latent frame t:            (temporal loop, KV cache across frames)
              temporal encoder -> indicator
              for each mask step i:             (set loop: tokens predicted in a random order)
                  spatial encoder -> Z
                  for each diffusion step j:    (denoise loop on the selected tokens only)
                      diffusion head -> guidance -> sampler update
         -> VAE decode -> output_type

Guidance runs 1, 2 or 3 passes per sample (`runtime.guidance`: CFG and the official HEAD options).

Random draws follow the official order and shapes, so a torch.Generator seed gives what the
official pipeline gives on the same weights and device; `draws=` injects recorded tensors instead.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np
import PIL.Image
import torch
from tqdm.auto import tqdm

from runtime import checkpoint
from runtime.configs import model_index, scheduler_config
from runtime.draws import RandomDraws
from runtime.guidance import Guidance
from runtime.model import vae as vae_ops
from runtime.model.kv_cache import KVCache
from runtime.model.text_encoder import encode_prompts, load_tokenizer
from runtime.model.transformer import NOVATransformer3DModel, patchify, unpatchify
from runtime.request import Request, validate_request
from runtime.schedules import SamplerTable, load_scheduler, mask_schedule


OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclasses.dataclass
class PipelineOutput:
    """The official output (`images` for an image VAE, `frames` for the video VAE, by output_type) plus `latents`.

    output_type "np": uint8 [B, H, W, 3] / [B, T, H, W, 3]; "pil": a list of PIL images (a video's frames stay
    the uint8 array, as officially); "pt": the decoded tensor in [-1, 1], [B, 3, H, W] / [B, 3, T, H, W];
    "latent": nothing decoded, `frames` holds the latents as the official pipeline returns them."""

    latents: torch.Tensor  # [B, C, T, h, w] scaled latents, prefilled frames first
    images: np.ndarray | list[PIL.Image.Image] | torch.Tensor | None = None
    frames: np.ndarray | torch.Tensor | None = None


class ReferencePipeline:
    def __init__(self, transformer: NOVATransformer3DModel, text_encoder, tokenizer, vae, scheduler):
        self.transformer, self.text_encoder, self.tokenizer = transformer, text_encoder, tokenizer
        self.vae, self.scheduler = vae, scheduler

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> "ReferencePipeline":
        """Load every component of a checkpoint folder, cast to `dtype` as the official pipeline does."""
        model_index(folder)
        return cls(transformer=checkpoint.load_transformer(folder, dtype, device),
                   text_encoder=checkpoint.load_text_encoder(folder, dtype, device),
                   tokenizer=load_tokenizer(os.path.join(folder, "tokenizer")),
                   vae=checkpoint.load_vae(folder, dtype, device),
                   scheduler=load_scheduler(scheduler_config(os.path.join(folder, "scheduler"))))

    @property
    def config(self):
        return self.transformer.config

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer.mask_embed.bos_token.device

    # ---------------------------------------------------------------------------------------------
    def text_features(self, request: Request) -> torch.Tensor:
        """Null-filled Phi-2 features [M, L, text_dim]: conditional rows, then (CFG) negative rows,
        each repeated num_images_per_prompt times."""
        embed, length = self.transformer.text_embed, self.config.text_token_len
        if request.prompts is not None:
            positive = encode_prompts(self.tokenizer, self.text_encoder, request.prompts, length)
        else:
            positive = request.prompt_embeds
        rows = list(positive)
        if request.guided:
            if request.negative_prompt_embeds is not None:
                rows += request.negative_prompt_embeds
            elif request.negative_prompts is not None:
                rows += encode_prompts(self.tokenizer, self.text_encoder, request.negative_prompts, length)
            else:  # "" encodes to no tokens: pure null features
                rows += [None] * len(positive)
        return embed.fill_null(rows).repeat_interleave(request.num_images_per_prompt, dim=0)

    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str] | None = None, *, negative_prompt: str | Sequence[str] | None = None,
                 num_inference_steps: int = 64, num_diffusion_steps: int = 25, guidance_scale: float = 5.0,
                 guidance_trunc: float = 0, guidance_renorm: float = 1, image_guidance_scale: float = 0,
                 spatiotemporal_guidance_scale: float = 0, flow_shift: float | None = None,
                 max_latent_length: int = 1, motion_flow: float | None = None,
                 image: np.ndarray | PIL.Image.Image | None = None, num_images_per_prompt: int = 1,
                 generator: torch.Generator | None = None, draws: RandomDraws | None = None,
                 latents: list[torch.Tensor] | None = None, prompt_embeds: list[torch.Tensor] | None = None,
                 negative_prompt_embeds: list[torch.Tensor] | None = None, output_type: str = "pil",
                 disable_progress_bar: bool = False) -> PipelineOutput:
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(map(repr, OUTPUT_TYPES))}, got {output_type!r}")
        if generator is not None and draws is not None:
            raise ValueError("give at most one of generator and draws")
        request = validate_request(
            self.config, prompt=prompt, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, num_inference_steps=num_inference_steps,
            num_diffusion_steps=num_diffusion_steps, guidance_scale=guidance_scale, guidance_trunc=guidance_trunc,
            guidance_renorm=guidance_renorm, image_guidance_scale=image_guidance_scale,
            spatiotemporal_guidance_scale=spatiotemporal_guidance_scale, flow_shift=flow_shift,
            max_latent_length=max_latent_length, motion_flow=motion_flow, image=image,
            num_images_per_prompt=num_images_per_prompt, latents=latents)
        config = {**self.scheduler.config, "_class_name": type(self.scheduler).__name__}
        # before any work: this refuses flow_shift on a DDPM checkpoint
        sampler = SamplerTable.from_config(config, request.num_diffusion_steps, request.flow_shift)
        latents = self.generate_latents(request, sampler, draws or RandomDraws(generator), disable_progress_bar)
        return self.postprocess(latents, output_type)

    def postprocess(self, latents: torch.Tensor, output_type: str) -> PipelineOutput:
        """Decode as the official image processor does for each output_type (see `PipelineOutput`)."""
        if output_type == "latent":
            return PipelineOutput(latents=latents, frames=latents)
        pixels = vae_ops.decode(self.vae, latents)
        name = "images" if pixels.dim() == 4 else "frames"
        if output_type == "pt":
            return PipelineOutput(latents=latents, **{name: pixels})
        array = vae_ops.to_uint8(pixels)
        if output_type == "pil" and name == "images":
            return PipelineOutput(latents=latents, images=[PIL.Image.fromarray(a) for a in array])
        return PipelineOutput(latents=latents, **{name: array})

    def prefilled_latents(self, request: Request, draws: RandomDraws) -> list[torch.Tensor]:
        """The frames that precede generation: the given `latents`, or the image's latent (the posterior
        sample is the first draw). The last one is frame 0 of the temporal loop; all are returned."""
        batch, dtype, device = request.batch, self.dtype, self.device
        if request.latents is not None:
            return [torch.as_tensor(frame).to(device=device, dtype=dtype) for frame in request.latents]
        if request.image is not None:
            return [vae_ops.encode_image(self.vae, request.image, draws).to(dtype).expand(batch, -1, -1, -1)]
        return []

    def generate_latents(self, request: Request, sampler: SamplerTable, draws: RandomDraws,
                         disable_progress_bar: bool = False) -> torch.Tensor:
        """-> [B, C, T, h, w]: the prefilled frames, then max_latent_length - 1 generated ones after them
        (max_latent_length without prefilled frames), as the official pipeline returns them."""
        model, config, dtype, device = self.transformer, self.config, self.dtype, self.device
        batch, guidance = request.batch, Guidance.of(request)

        flow = torch.full((batch * min(guidance.passes, 2),), request.motion_flow)
        condition = guidance.text_rows(model.condition(self.text_features(request).to(device), flow.to(device)))
        prefilled = self.prefilled_latents(request, draws)

        frames = request.max_latent_length
        time_embed = model.video_pos_embed(frames)
        kv_cache = None
        if frames > 1:  # the last frame never enters the temporal encoder
            capacity = condition.shape[1] + frames * config.num_video_tokens
            kv_cache = KVCache(config.video_depth, condition.shape[0], config.num_heads, capacity,
                               config.width // config.num_heads, dtype, device)
        schedule = mask_schedule(config.num_image_tokens, request.num_inference_steps)

        canvas = torch.zeros(batch, config.image_dim, *config.latent_size, dtype=dtype, device=device)
        generated, order, anchor = [], None, None
        for t in tqdm(range(frames), desc="frames", disable=disable_progress_bar or frames == 1):
            tokens = model.frame_tokens(None if t == 0 else canvas, time_embed[t], batch)
            # image guidance: its unconditional pass sees the raw BOS token (no time or space embedding)
            tokens = guidance.stack(tokens, uncond=model.mask_embed.bos_token)
            current = model.temporal(tokens, condition if t == 0 else None, kv_cache)
            anchor = current if t == 0 else anchor
            indicator = current if t == 0 else model.indicator(anchor, current)
            if t == 0 and prefilled:
                canvas = prefilled[-1].clone()
            else:
                order = self.generate_frame(canvas, indicator, schedule, sampler, order, guidance, draws,
                                            disable_progress_bar or frames > 1)
                generated.append(canvas.clone())
        return torch.stack(prefilled + generated, dim=2)

    def generate_frame(self, canvas: torch.Tensor, indicator: torch.Tensor, schedule: list[int],
                       sampler: SamplerTable, order: torch.Tensor | None, guidance: Guidance,
                       draws: RandomDraws, disable_progress_bar: bool) -> torch.Tensor:
        """Fill `canvas` [B, C, h, w] set by set; returns the token order (drawn once per video)."""
        model, config = self.transformer, self.config
        batch, dtype = canvas.shape[0], canvas.dtype
        canvas.zero_()
        mask = torch.ones(batch, config.num_image_tokens, 1, dtype=dtype, device=canvas.device)
        known = torch.zeros(batch, 0, 1, dtype=torch.int64, device=canvas.device)
        position = 0
        for count in tqdm(schedule, desc="mask steps", disable=disable_progress_bar):
            if order is None:
                order = draws.uniform(mask.shape, dtype).to(canvas.device).argsort(dim=1)
            selected = order[:, position:position + count]
            position += count
            z = model.spatial(canvas, mask, indicator, guidance.stack(known)[..., 0])
            pred_mask = torch.zeros_like(mask).scatter(1, selected, 1)
            mask = mask * (1 - pred_mask)
            known = torch.cat([known, selected], dim=1)
            noise = draws.normal(tuple(canvas.shape), dtype).to(canvas.device)
            sample = self.denoise(z, noise, selected, sampler, guidance, draws)
            canvas += unpatchify(sample * pred_mask, config.patch_size, *config.latent_size)
        return order

    def denoise(self, z: torch.Tensor, x: torch.Tensor, selected: torch.Tensor, sampler: SamplerTable,
                guidance: Guidance, draws: RandomDraws) -> torch.Tensor:
        """Diffusion loop for the selected tokens; x [B, C, h, w] starts as noise. -> patchified [B, N, p*p*C].

        Guidance combines whole token grids, as the official head returns them (unselected tokens keep
        the input): guidance_renorm's norms run over every token of a sample."""
        model, config = self.transformer, self.config
        p, (h, w), batch = config.patch_size, config.latent_size, x.shape[0]
        passes, guided_steps = guidance.passes, guidance.guided_steps(sampler.timesteps)
        index = guidance.stack(selected).expand(-1, -1, config.token_dim)
        z_sel = z.gather(1, guidance.stack(selected).expand(-1, -1, z.shape[-1]))
        for j, timestep in enumerate(torch.from_numpy(sampler.timesteps)):
            if passes > 1 and not guided_steps[j]:  # guidance_trunc: off for the rest of this mask step
                passes, index, z_sel = 1, index[:batch], z_sel[:batch]
            tokens = torch.cat([patchify(x, p)] * passes)
            out = model.denoise_head(tokens.gather(1, index), timestep.expand(z_sel.shape[0]).to(x.device), z_sel)
            model_out = unpatchify(guidance.combine(tokens.scatter(1, index, out), passes), p, h, w)
            step_noise = draws.normal(tuple(x.shape), model_out.dtype).to(x.device) if sampler.draws_noise(j) else None
            x = sampler.step(j, x, model_out, step_noise)
        return patchify(x, p)
