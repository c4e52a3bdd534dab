"""How an exported graph computes 3-D convolutions, and the exporter translation that makes them.

The video VAE's convolutions are causal `nn.Conv3d`s (runtime/model/vae_opensora.py: time padded in front by a
replicate pad, kernel 3 in time). How the ONNX graph spells them is a build choice, by backend
(`export.onnx_export.export_forms`):

- `native`: one 5-D `Conv` per convolution, the exporter's own translation. TensorRT and cuDNN run 3-D
  convolutions natively.
- `frames`: each 3-D convolution of stride 1 in time as one 2-D `Conv` over the frames, its k time taps stacked as
  channels: input [B, C, T + k - 1, H, W] -> k time slices concatenated -> [B * T, k * C, H, W] -> Conv with the
  weight [O, C, k, kh, kw] laid out as [O, k * C, kh, kw] -> [B, O, T, H', W']. ONNX Runtime's CPU provider runs
  5-D convolutions through a generic im2col path and 2-D ones through its blocked (NCHWc) kernels: measured at
  1 thread on the Intel host, 1.2-1.5x faster per convolution (benchmarks/results/2026-12-03-cpu2-intel). The
  sums are the same products in another order: equal within fp32 rounding (the build's validation checks it).

Other 3-D convolutions (strided in time) and all 2-D ones keep the exporter's own translation.
"""

from __future__ import annotations

from typing import Callable


def translation_table(form: str | None) -> dict[Callable, Callable] | None:
    """The dynamo exporter's `custom_translation_table` entries for `form` (None: the exporter's own ops)."""
    if form != "frames":
        return None
    import torch

    return {torch.ops.aten.conv3d.default: _conv3d}  # the exporter keeps conv3d (it does not decompose it)


def _conv3d(input, weight, bias=None, stride=(1, 1, 1), padding=(0, 0, 0), dilation=(1, 1, 1), groups: int = 1):
    """aten.conv3d of stride 1 in time as a 2-D Conv over the frames (traced by the exporter); others as the
    exporter's own translation."""
    from onnxscript import opset18 as op
    from onnxscript.function_libs.torch_lib.ops.core import aten_conv3d

    if not (groups == 1 and stride[0] == 1 and padding[0] == 0 and tuple(dilation) == (1, 1, 1)
            and all(isinstance(d, int) for d in weight.shape)):
        return aten_conv3d(input, weight, bias, stride, padding, dilation, groups)
    out_channels, channels, taps, kh, kw = weight.shape
    length = op.Shape(input, start=2, end=3)  # T + taps - 1
    slices = [op.Slice(input, op.Constant(value_ints=[tap]), op.Sub(length, op.Constant(value_ints=[taps - 1 - tap])),
                       op.Constant(value_ints=[2])) for tap in range(taps)]
    stacked = op.Transpose(op.Concat(*slices, axis=1), perm=[0, 2, 1, 3, 4])  # [B, T, taps * C, H, W]
    frames = op.Reshape(stacked, op.Concat(op.Constant(value_ints=[-1, taps * channels]),
                                           op.Shape(input, start=3, end=5), axis=0))
    kernel = op.Reshape(op.Transpose(weight, perm=[0, 2, 1, 3, 4]),
                        op.Constant(value_ints=[out_channels, taps * channels, kh, kw]))
    attributes = dict(kernel_shape=[kh, kw], strides=list(stride[1:]), pads=[*padding[1:], *padding[1:]])
    out = op.Conv(frames, kernel, bias, **attributes) if bias is not None else op.Conv(frames, kernel, **attributes)
    batch_first = op.Concat(op.Shape(input, start=0, end=1), op.Constant(value_ints=[-1]),
                            op.Shape(out, start=1, end=4), axis=0)  # [B, T, O, H', W']
    return op.Transpose(op.Reshape(out, batch_first), perm=[0, 2, 1, 3, 4])
