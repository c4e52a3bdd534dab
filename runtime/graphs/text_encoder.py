"""The `text_encoder` graph: Phi-2 over a batch of prompts' token ids."""

from __future__ import annotations

import torch
from torch import nn

from runtime.graphs.common import GraphModule
from runtime.graphs.contract import GraphContext, GraphSpec, dynamic, randint, sources, tensor


class TextEncoderGraph(GraphModule):
    """`text_encoder`: input_ids [P, 256] int64 -> Phi-2 last_hidden_state [P, 256, Dt] float32 (causal, no mask)."""

    def __init__(self, encoder: nn.Module, compute_dtype: torch.dtype):
        super().__init__(compute_dtype)
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        with self.islands():
            return self.encoder(input_ids=input_ids).last_hidden_state.float()


def text_encoder_spec(ctx: GraphContext) -> GraphSpec:
    g, name = ctx.geometry, "text_encoder"
    dims = dynamic("text_batch", 1, g.text_batch)
    rows = "text_batch" if dims else g.text_batch
    vocab = min(int(ctx.configs.text_encoder.get("vocab_size", 50257)), 50257)
    pad_id = int(ctx.configs.text_encoder.get("pad_token_id") or 50256)

    def text_encoder_sample(values: dict[str, int], gen: torch.Generator) -> dict[str, torch.Tensor]:
        count = values.get("text_batch", g.text_batch)
        ids = randint(0, vocab, (count, g.text_len), gen)
        lengths = randint(1, g.text_len + 1, (count,), gen)
        ids[torch.arange(g.text_len).view(1, -1) >= lengths.view(-1, 1)] = pad_id
        return {"input_ids": ids}

    return GraphSpec(
        name=name, precision=ctx.precisions[name],
        doc="Phi-2 over right-padded token ids (no mask: causal, so padding does not change real positions). "
            "Null-filling is done by temporal_prefill from the prompt lengths.",
        inputs=(tensor("input_ids", "int64", rows, g.text_len),),  # right-padded with the pad id
        outputs=(tensor("hidden", "float32", rows, g.text_len, g.text_dim),),  # last_hidden_state
        dims=dims, component="text_encoder", weight_prefixes=("model.",),
        sources=sources(__name__),
        build=lambda: TextEncoderGraph(ctx.module("text_encoder", name), ctx.dtype(name)).eval(),
        sample=text_encoder_sample)
