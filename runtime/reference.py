"""Reference pipeline: a plain eager port of the official NOVA inference algorithm (NOVA_SPEC §5).

It is the parity baseline of every compiled backend. The loops are written out as the official
pipeline runs them:

    text -> for each latent frame t:            (temporal loop, KV cache across frames)
              temporal encoder -> indicator
              for each mask step i:             (set loop: tokens predicted in a random order)
                  spatial encoder -> Z
                  for each diffusion step j:    (denoise loop on the selected tokens only)
                      diffusion head -> CFG -> sampler update
         -> VAE decode -> uint8 frames

Random draws follow the official order and shapes, so a torch.Generator seed gives what the
official pipeline gives on the same weights and device; `draws=` injects recorded tensors instead.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from runtime import checkpoint
from runtime.configs import model_index, scheduler_config
from runtime.draws import RandomDraws
from runtime.model import vae as vae_ops
from runtime.model.kv_cache import KVCache
from runtime.model.text_encoder import encode_prompts, load_tokenizer
from runtime.model.transformer import NOVATransformer3DModel, patchify, unpatchify
from runtime.request import Request, validate_request
from runtime.schedules import SamplerTable, load_scheduler, mask_schedule


@dataclasses.dataclass
class PipelineOutput:
    latents: torch.Tensor  # [B, C, T, h, w] scaled latents
    images: np.ndarray | None = None  # [B, H, W, 3] uint8, for an image VAE
    frames: np.ndarray | None = None  # [B, T, H, W, 3] uint8, for the video VAE


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
                 max_latent_length: int = 1, motion_flow: float | None = None, image: np.ndarray | None = None,
                 num_images_per_prompt: int = 1, generator: torch.Generator | None = None,
                 draws: RandomDraws | None = None, prompt_embeds: list[torch.Tensor] | None = None,
                 negative_prompt_embeds: list[torch.Tensor] | None = None, output_type: str = "np",
                 disable_progress_bar: bool = False) -> PipelineOutput:
        if output_type not in ("np", "latent"):
            raise ValueError(f"output_type must be 'np' or 'latent', got {output_type!r}")
        if generator is not None and draws is not None:
            raise ValueError("give at most one of generator and draws")
        request = validate_request(
            self.config, prompt=prompt, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, num_inference_steps=num_inference_steps,
            num_diffusion_steps=num_diffusion_steps, guidance_scale=guidance_scale,
            max_latent_length=max_latent_length, motion_flow=motion_flow, image=image,
            num_images_per_prompt=num_images_per_prompt)
        draws = draws or RandomDraws(generator)
        latents = self.generate_latents(request, draws, disable_progress_bar)
        if output_type == "latent":
            return PipelineOutput(latents=latents)
        pixels = vae_ops.to_uint8(vae_ops.decode(self.vae, latents))
        return PipelineOutput(latents=latents, **{"images" if pixels.ndim == 4 else "frames": pixels})

    def generate_latents(self, request: Request, draws: RandomDraws, disable_progress_bar: bool = False) -> torch.Tensor:
        model, config, dtype, device = self.transformer, self.config, self.dtype, self.device
        batch, guided = request.batch, request.guided
        dup = (lambda x: torch.cat([x, x])) if guided else (lambda x: x)

        flow = torch.full((batch * (2 if guided else 1),), request.motion_flow)
        condition = model.condition(self.text_features(request).to(device), flow.to(device))
        first_latent = None
        if request.image is not None:  # the posterior sample is the first draw
            first_latent = vae_ops.encode_image(self.vae, request.image, draws).to(dtype)
            first_latent = first_latent.expand(batch, -1, -1, -1)

        frames = request.max_latent_length
        time_embed = model.video_pos_embed(frames)
        kv_cache = None
        if frames > 1:  # the last frame never enters the temporal encoder
            capacity = condition.shape[1] + frames * config.num_video_tokens
            kv_cache = KVCache(config.video_depth, condition.shape[0], config.num_heads, capacity,
                               config.width // config.num_heads, dtype, device)
        schedule = mask_schedule(config.num_image_tokens, request.num_inference_steps)
        scheduler_config = {**self.scheduler.config, "_class_name": type(self.scheduler).__name__}
        sampler = SamplerTable.from_config(scheduler_config, request.num_diffusion_steps)

        canvas = torch.zeros(batch, config.image_dim, *config.latent_size, dtype=dtype, device=device)
        outputs, order, anchor = [], None, None
        for t in tqdm(range(frames), desc="frames", disable=disable_progress_bar or frames == 1):
            tokens = model.frame_tokens(None if t == 0 else canvas, time_embed[t], batch)
            current = model.temporal(dup(tokens), condition if t == 0 else None, kv_cache)
            anchor = current if t == 0 else anchor
            indicator = current if t == 0 else model.indicator(anchor, current)
            if t == 0 and first_latent is not None:
                canvas = first_latent.clone()
            else:
                order = self.generate_frame(canvas, indicator, schedule, sampler, order, request, draws,
                                            disable_progress_bar or frames > 1)
            outputs.append(canvas.clone())
        return torch.stack(outputs, dim=2)

    def generate_frame(self, canvas: torch.Tensor, indicator: torch.Tensor, schedule: list[int],
                       sampler: SamplerTable, order: torch.Tensor | None, request: Request,
                       draws: RandomDraws, disable_progress_bar: bool) -> torch.Tensor:
        """Fill `canvas` [B, C, h, w] set by set; returns the token order (drawn once per video)."""
        model, config, guided = self.transformer, self.config, request.guided
        dup = (lambda x: torch.cat([x, x])) if guided else (lambda x: x)
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
            z = model.spatial(canvas, mask, indicator, dup(known)[..., 0])
            pred_mask = torch.zeros_like(mask).scatter(1, selected, 1)
            mask = mask * (1 - pred_mask)
            known = torch.cat([known, selected], dim=1)
            noise = draws.normal(tuple(canvas.shape), dtype).to(canvas.device)
            sample = self.denoise(z, noise, selected, sampler, request, draws)
            canvas += unpatchify(sample * pred_mask, config.patch_size, *config.latent_size)
        return order

    def denoise(self, z: torch.Tensor, x: torch.Tensor, selected: torch.Tensor, sampler: SamplerTable,
                request: Request, draws: RandomDraws) -> torch.Tensor:
        """Diffusion loop for the selected tokens; x [B, C, h, w] starts as noise. -> patchified [B, N, p*p*C]."""
        model, config, guided, g = self.transformer, self.config, request.guided, request.guidance_scale
        dup = (lambda t: torch.cat([t, t])) if guided else (lambda t: t)
        p, (h, w) = config.patch_size, config.latent_size
        index = selected.expand(-1, -1, config.token_dim)
        z_sel = z.gather(1, dup(selected).expand(-1, -1, z.shape[-1]))
        for j, timestep in enumerate(torch.from_numpy(sampler.timesteps)):
            tokens = patchify(x, p)
            out = model.denoise_head(dup(tokens.gather(1, index)), timestep.expand(z_sel.shape[0]).to(x.device), z_sel)
            if guided:
                cond, uncond = out.chunk(2)
                out = uncond + (cond - uncond) * g
            model_out = unpatchify(tokens.scatter(1, index, out), p, h, w)
            step_noise = draws.normal(tuple(x.shape), model_out.dtype).to(x.device) if sampler.draws_noise(j) else None
            x = sampler.step(j, x, model_out, step_noise)
        return patchify(x, p)
