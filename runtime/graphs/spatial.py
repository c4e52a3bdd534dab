"""The `spatial` graph: one mask step of the spatial encoder, -> the conditions Z of this step's tokens."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from runtime.graphs.common import GraphModule, cfg_rows
from runtime.graphs.contract import GraphContext, GraphSpec, dynamic, randint, randn, random_orders, sources, tensor
from runtime.graphs.profile import Geometry
from runtime.model.transformer import Attention, NOVATransformer3DModel, unpatchify


class SpatialGraph(GraphModule):
    """`spatial`: one mask step of the spatial encoder, exact, on a bucketed number of known-token slots.

    canvas [B, C, h, w] f32 (0 at unknown tokens), known_ids [B, K] int64 (the token order's first K
    ids: distinct, the known tokens first), known_count [1] int64 (k <= K: how many of them are
    known), indicator [M, Nv, D], selected [B, n_max] int64 -> z_selected [M, n_max, D].

    The official encoder half runs on [indicator, the k known tokens], k growing every step. Here it
    runs on [indicator, K slots] with K = k rounded up to a bucket (`Geometry.known_slots`), and a key
    mask hides the slots beyond k, so every query sees exactly the official keys. The encoded slots are
    scattered back (masked slots write back the mask token) and the decoder half runs on all N tokens, but its
    last block computes only the selected tokens (their queries against every token's keys and values): the
    official code computes all N there and reads the selected ones (4-9 % of mid-t2i's call: engines/README.md).
    """

    def __init__(self, model: NOVATransformer3DModel, geometry: Geometry, compute_dtype: torch.dtype):
        super().__init__(compute_dtype)
        self.model, self.geometry = model, geometry

    def forward(self, canvas: torch.Tensor, known_ids: torch.Tensor, known_count: torch.Tensor,
                indicator: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        model, g, encoder = self.model, self.geometry, self.model.image_encoder
        with self.islands():
            position = model.image_space_embed.to(self.compute_dtype)
            # As NOVATransformer3DModel.spatial (same rounding): patch embed, CFG copies, then positions;
            # unknown tokens are the mask token (+ position).
            embedded = cfg_rows(encoder.patch_embed(canvas.to(self.compute_dtype)), g.blocks) + position
            blank = (model.mask_embed.mask_token.to(self.compute_dtype) + position).expand(embedded.shape)
            index = cfg_rows(known_ids, g.blocks).unsqueeze(-1).expand(-1, -1, g.width)
            slot_known = (torch.arange(known_ids.shape[1], device=known_ids.device) < known_count).view(1, -1, 1)
            keys = torch.cat([slot_known.new_ones(1, g.num_video_tokens), slot_known[..., 0]], dim=1).view(1, 1, 1, -1)
            h = torch.cat([indicator, embedded.gather(1, index)], dim=1)
            for block in encoder.blocks[: encoder.encoder_depth]:
                h = block(h, attn_mask=keys)
            condition, encoded = h.split([g.num_video_tokens, known_ids.shape[1]], dim=1)
            written = torch.where(slot_known, encoded, blank.gather(1, index))
            h = torch.cat([condition, blank.scatter(1, index, written)], dim=1)
            *blocks, last = encoder.blocks[encoder.encoder_depth:]
            for block in blocks:
                h = block(h)
            # Only the selected tokens' outputs are read, and after the last attention everything is per token
            # (MLP, LayerNorm): the last block runs their queries alone, against every token's keys and values.
            rows = cfg_rows(selected, g.blocks).unsqueeze(-1).expand(-1, -1, h.shape[-1])
            chosen = h[:, g.num_video_tokens:].gather(1, rows)
            return encoder.norm(last(chosen, kv_cache=_EveryToken(last.attn, h)))


class _EveryToken:
    """The `kv_cache` of a block run on some tokens' queries (`Attention`'s protocol): every token's keys and
    values, projected with the key and value rows of the block's QKV weight."""

    def __init__(self, attention: Attention, tokens: torch.Tensor):
        b, n, dim = tokens.shape
        kv = F.linear(tokens, attention.qkv.weight[dim:], attention.qkv.bias[dim:])
        self.k, self.v = kv.reshape(b, n, 2, attention.num_heads, attention.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k, self.v


def spatial_spec(ctx: GraphContext) -> GraphSpec:
    g, name = ctx.geometry, "spatial"
    B, M, N, n, act = g.batch, g.model_batch, g.num_tokens, g.max_tokens_per_step, ctx.dtype_name(name)
    dims = dynamic("known_slots", g.known_bucket, g.max_known_slots, opt=g.known_slots(g.max_known_slots // 2))
    slots = "known_slots" if dims else g.max_known_slots

    def spatial_sample(values: dict[str, int], gen: torch.Generator) -> dict[str, torch.Tensor]:
        count_slots = values.get("known_slots", g.max_known_slots)
        count = int(randint(0, count_slots + 1, (1,), gen))
        order = random_orders(B, N, gen)
        unknown = torch.ones(B, N, g.token_dim).scatter(1, order[:, :count, None].expand(-1, -1, g.token_dim), 0)
        known_pixels = unpatchify(1 - unknown, g.patch, *g.latent_size)  # the canvas is 0 where unknown
        return {"canvas": known_pixels * randn((B, g.channels, *g.latent_size), gen),
                "known_ids": order[:, :count_slots], "known_count": torch.tensor([count]),
                "indicator": randn((M, g.num_video_tokens, g.width), gen, ctx.dtype(name)),
                "selected": order[:, (count + torch.arange(n)) % N]}

    return GraphSpec(
        name=name, precision=ctx.precisions[name],
        doc="One mask step of the spatial encoder: the encoder half on the known tokens (a bucketed number of "
            "slots under a key mask: exactly the official known-token gather), the decoder half on all tokens "
            "(its last block on the selected tokens' queries), then Z at the selected tokens.",
        inputs=(tensor("canvas", "float32", B, g.channels, *g.latent_size),  # latent frame so far (0 at unknown)
                tensor("known_ids", "int64", B, slots),  # the token order's first K ids (Geometry.known_slots(k))
                tensor("known_count", "int64", 1),  # k: how many of known_ids are known (the rest are masked)
                tensor("indicator", act, M, g.num_video_tokens, g.width),
                tensor("selected", "int64", B, n)),  # this step's token ids, padded with distinct ids
        outputs=(tensor("z_selected", act, M, n, g.width),),
        dims=dims, component="transformer", weight_prefixes=("mask_embed.mask_token", "image_encoder."),
        sources=sources(__name__),
        build=lambda: SpatialGraph(ctx.module("transformer", name), g, ctx.dtype(name)).eval(),
        sample=spatial_sample,
        attention=ctx.attention,
        notes=(f"encoder half on known-token slots in buckets of {g.known_bucket} (N / 8 rounded up), "
               f"key-masked beyond k",))
