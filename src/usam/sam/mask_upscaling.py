"""The mask decoder's output upscaling (SAM 1's and SAM 2's) as matrix products.

A ``ConvTranspose2d`` with kernel = stride = 2 writes non-overlapping 2 x 2 blocks,
``out[2h + a, 2w + b] = x[h, w] @ W[:, :, a, b] + bias``: one product (pixels x C_in) @
(C_in x 4 C_out) whose rows hold each input pixel's block. LayerNorm2d (over channels,
per output pixel), GELU and SAM 2's added high-resolution features act per output pixel,
so they run in that block layout, and so do the second transposed convolution and the
product with the hypernetwork outputs. Only the final masks (3 x 256 x 256 per point)
are put into image order. Exact in real arithmetic: float32 rounding differs from the
official convolutions by ~1e-7 relative, far inside the contract of
``usam.sam.mask_engine``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_BLOCK = 2  # kernel = stride of both transposed convolutions


def _parts(upscaling: torch.nn.Sequential):
    """(conv1, norm, act1, conv2, act2), checked to be the layout SAM's decoders share."""
    convs = (upscaling[0], upscaling[3]) if len(upscaling) == 5 else ()
    if not convs or any(
        not isinstance(c, torch.nn.ConvTranspose2d)
        or c.kernel_size != (_BLOCK, _BLOCK)
        or c.stride != (_BLOCK, _BLOCK)
        or c.padding != (0, 0)
        for c in convs
    ):
        raise ValueError(
            "the mask decoder's output_upscaling is not SAM's (two 2x2, stride-2 "
            "transposed convolutions around a LayerNorm2d): this model is not supported"
        )
    return tuple(upscaling)


def _as_matrix(conv: torch.nn.ConvTranspose2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight (C_in, 4 C_out) with columns (a, b, channel), and the bias repeated to match."""
    weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.in_channels, -1)
    return weight, conv.bias.repeat(_BLOCK * _BLOCK)


def _activate(act: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(act, torch.nn.GELU):
        return torch.ops.aten.gelu_(x, approximate=act.approximate)
    return act(x)


def blocked_high_res(s0: torch.Tensor, s1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM 2's (s0, s1) high-resolution features (1, C, 4H, 4W) and (1, C, 2H, 2W) in the
    block layout of :func:`upscale`, once per image."""
    _, c1, h2, w2 = s1.shape
    h, w = h2 // 2, w2 // 2
    s1 = s1.view(c1, h, 2, w, 2).permute(1, 3, 2, 4, 0).reshape(1, -1, c1)
    c0 = s0.shape[1]
    s0 = s0.view(c0, h, 2, 2, w, 2, 2).permute(1, 4, 2, 5, 3, 6, 0).reshape(1, -1, c0)
    return s0.contiguous(), s1.contiguous()


def upscale(
    upscaling: torch.nn.Sequential,
    keys: torch.Tensor,
    high_res: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``output_upscaling`` of the final image keys (n, H * W, C) in the block layout:
    (n, H * W * 16, C_out), rows ordered (h, w, a1, b1, a2, b2). ``high_res``: SAM 2's
    features from :func:`blocked_high_res`, added after each convolution as its
    ``predict_masks`` does.
    """
    conv1, norm, act1, conv2, act2 = _parts(upscaling)
    n = keys.shape[0]
    weight, bias = _as_matrix(conv1)
    x = torch.addmm(bias, keys.reshape(-1, keys.shape[-1]), weight).view(n, -1, conv1.out_channels)
    if high_res is not None:
        x.add_(high_res[1])
    x = F.layer_norm(x, (conv1.out_channels,), norm.weight, norm.bias, norm.eps)
    x = _activate(act1, x)
    weight, bias = _as_matrix(conv2)
    x = torch.addmm(bias, x.view(-1, conv1.out_channels), weight).view(n, -1, conv2.out_channels)
    if high_res is not None:
        x.add_(high_res[0])
    return _activate(act2, x)


def masks_from(upscaled: torch.Tensor, hyper_in: torch.Tensor, size: tuple[int, int]):
    """Mask logits (n, k, 4H, 4W) of hypernetwork outputs ``hyper_in`` (n, k, C_out) over
    block-layout features ``upscaled``; ``size``: (H, W) of the image embedding."""
    n, k = hyper_in.shape[:2]
    h, w = size
    masks = torch.bmm(upscaled, hyper_in.transpose(1, 2))  # (n, rows, k)
    masks = masks.view(n, h, w, 2, 2, 2, 2, k).permute(0, 7, 1, 3, 5, 2, 4, 6)
    return masks.reshape(n, k, 4 * h, 4 * w)


def to_image_order(upscaled: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Block-layout features (n, rows, C) as the official (n, C, 4H, 4W)."""
    n, _, c = upscaled.shape
    h, w = size
    x = upscaled.view(n, h, w, 2, 2, 2, 2, c).permute(0, 7, 1, 3, 5, 2, 4, 6)
    return x.reshape(n, c, 4 * h, 4 * w)
