"""The temporal encoder with its static KV cache equals the full block-causal sequence without a cache."""

import pytest
import torch
from torch.nn import functional as F

from runtime.model.kv_cache import KVCache
from runtime.model.transformer import VisionTransformer


def _full_block_causal(encoder: VisionTransformer, prefix, frames, num_heads):
    """Recompute all frames at once: frame t (and the prefix, with frame 0) sees the prefix and frames <= t."""
    x = torch.cat([prefix, *frames], dim=1)
    group = torch.cat([torch.zeros(prefix.shape[1] + frames[0].shape[1], dtype=torch.long)]
                      + [torch.full((f.shape[1],), t) for t, f in enumerate(frames[1:], start=1)])
    allowed = group[:, None] >= group[None, :]
    for block in encoder.blocks:
        b, n, d = x.shape
        q, k, v = block.attn.qkv(x).reshape(b, n, 3, num_heads, d // num_heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        x = block.norm1(block.attn.proj(attn.transpose(1, 2).reshape(b, n, d))) + x
        x = block.norm2(block.mlp(x)) + x
    return encoder.norm(x)


def test_cached_frames_equal_full_block_causal_sequence():
    torch.manual_seed(0)
    dim, heads, depth = 32, 2, 3
    encoder = VisionTransformer(depth, dim, heads, patch=4, image_dim=4).eval()
    prefix = torch.randn(2, 5, dim)
    frames = [torch.randn(2, 6, dim) for _ in range(4)]
    cache = KVCache(depth, 2, heads, capacity=5 + 4 * 6, head_dim=dim // heads, dtype=torch.float32)
    with torch.no_grad():
        cached = [encoder(f, prefix if t == 0 else None, cache) for t, f in enumerate(frames)]
        full = _full_block_causal(encoder, prefix, frames, heads)
    assert cache.length == 5 + 4 * 6
    for t, out in enumerate(cached):
        start = 5 + 6 * t
        torch.testing.assert_close(out, full[:, start:start + 6], rtol=1e-5, atol=1e-5)


def test_cache_overflow_is_refused():
    cache = KVCache(1, 1, 1, capacity=4, head_dim=2, dtype=torch.float32)
    cache.update(0, torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2))
    cache.advance(3)
    with pytest.raises(ValueError, match="KV cache overflow: 5 positions needed, capacity is 4"):
        cache.update(0, torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
