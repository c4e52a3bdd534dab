"""Which operators an exported graph computes attention with, and the exporter translation that makes them.

Every graph's attention is `F.scaled_dot_product_attention` (runtime/model/transformer.py; Phi-2's
through transformers' SDPA path). How the ONNX graph spells it is a build choice, by backend
(`export.onnx_export.export_forms`):

- `standard`: MatMul / Softmax (+ Where for a boolean mask) at opset 20, the exporter's own translation.
  Every backend runs it; TensorRT's parser fuses this pattern into its own attention kernels.
- `ort-mha`: ONNX Runtime's contrib op `com.microsoft.MultiHeadAttention`, one node per attention, run
  by its fused CPU kernel (and its flash / memory-efficient kernels on CUDA). ONNX Runtime only.

The `ort-mha` translation keeps SDPA's semantics exactly: query [B, H, S, Dh] goes in as [B, S, H*Dh]; keys
and values of the query's own length (self-attention) go in that way too, so that ONNX Runtime's transpose
optimizer cancels the Transposes of the fused QKV projection against them (mid-t2i spatial: ~5 % per call at
2 threads, benchmarks/results/2026-12-03-cpu2-amd); longer keys and values (temporal_step's whole KV cache)
stay [B, H, L, Dh], the op's BNSH key form, so the cache is read in place. A boolean mask (True = may attend)
becomes the additive `attention_bias` (0 / -inf, broadcast over batch and heads, expanded to [.., S, L]), a
float mask is that bias, `is_causal` a lower-triangular bias; the scale is passed as given (default
1/sqrt(Dh), the op's default too). The output comes back as [B, H, S, Dh].
"""

from __future__ import annotations

from typing import Callable


def translation_table(form: str | None) -> dict[Callable, Callable] | None:
    """The dynamo exporter's `custom_translation_table` for `form` (None: the exporter's own ops; forms are checked
    where a build declares them, `build_specs`)."""
    if form != "ort-mha":
        return None
    import torch

    return {torch.ops.aten.scaled_dot_product_attention.default: _multi_head_attention}


def _multi_head_attention(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                          scale: float | None = None, enable_gqa: bool = False):
    """aten SDPA as com.microsoft.MultiHeadAttention (traced by the exporter: Python control flow is static)."""
    import onnx_ir as ir
    from onnxscript import opset18 as op

    if dropout_p or enable_gqa:
        raise NotImplementedError("the ort-mha attention form exports inference attention without dropout or GQA")
    heads, head_dim = query.shape[1], query.shape[3]
    if not isinstance(heads, int) or not isinstance(head_dim, int):
        raise NotImplementedError("the ort-mha attention form needs static head count and head size")

    def sequence_major(x):  # [B, H, S, Dh] -> [B, S, H*Dh]
        return op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, heads * head_dim]))

    # Sizes and types below are read from q and k, not from the BNSH inputs: a Transpose cancels only where the
    # BNSH value has no other consumer.
    q, k, v = sequence_major(query), key, value
    if key.shape[2] == query.shape[2]:  # self-attention
        k, v = sequence_major(key), sequence_major(value)
    query_length = op.Shape(q, start=1, end=2)
    blocked = op.CastLike(op.Constant(value_float=float("-inf")), q)
    bias, rank = None, 0
    if is_causal:  # -inf above the diagonal of [S, L]
        key_length = op.Shape(key, start=2, end=3) if k is key else op.Shape(k, start=1, end=2)
        square = op.Concat(query_length, key_length, axis=0)
        bias, rank = op.Trilu(op.Expand(blocked, square), op.Constant(value_int=1), upper=1), 2
    elif attn_mask is not None and attn_mask.dtype == ir.DataType.BOOL:
        bias, rank = op.Where(attn_mask, op.CastLike(op.Constant(value_float=0.0), q), blocked), len(attn_mask.shape)
    elif attn_mask is not None:
        bias, rank = op.CastLike(attn_mask, q), len(attn_mask.shape)
    if bias is not None:  # the op takes a [B or 1, H or 1, S, L] bias: add the leading axes, expand the query axis
        if rank < 4:
            bias = op.Reshape(bias, op.Concat(op.Constant(value_ints=[1] * (4 - rank)), op.Shape(bias), axis=0))
        rows = op.Concat(op.Constant(value_ints=[1, 1]), query_length, op.Constant(value_ints=[1]), axis=0)
        bias = op.Expand(bias, rows)
    attributes = {"num_heads": heads} if scale is None else {"num_heads": heads, "scale": float(scale)}
    out = _multi_head_attention_op()(q, k, v, None, None, bias, **attributes)
    shape = op.Concat(op.Shape(q, start=0, end=1), query_length, op.Constant(value_ints=[heads, head_dim]), axis=0)
    return op.Transpose(op.Reshape(out, shape), perm=[0, 2, 1, 3])


def _multi_head_attention_op():
    """com.microsoft.MultiHeadAttention as an onnxscript op. ONNX does not know contrib ops, so the schema (the
    inputs this translation uses, in the op's order, and its attributes) is declared here."""
    from onnx import defs
    from onnxscript.values import Op, Opset

    optional = defs.OpSchema.FormalParameterOption.Optional
    inputs = [defs.OpSchema.FormalParameter(name, "T", param_option=optional if name != "query" else
                                            defs.OpSchema.FormalParameterOption.Single)
              for name in ("query", "key", "value", "bias")]
    inputs += [defs.OpSchema.FormalParameter("key_padding_mask", "M", param_option=optional),
               defs.OpSchema.FormalParameter("attention_bias", "T", param_option=optional)]
    attr = defs.OpSchema.AttrType
    schema = defs.OpSchema(
        "MultiHeadAttention", "com.microsoft", 1, inputs=inputs, outputs=[defs.OpSchema.FormalParameter("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], "")],
        attributes=[defs.OpSchema.Attribute("num_heads", attr.INT, required=True),
                    defs.OpSchema.Attribute("scale", attr.FLOAT, required=False)])
    return Op(Opset("com.microsoft", 1), "MultiHeadAttention", schema)
