"""SAM's ViT image encoder, bit-identical to ``ImageEncoderViT.forward`` and faster on CPU.

The official attention materialises every (query, key) logit of a block at once: for
the four global blocks of the 1024-pixel models that is heads x 4096 x 4096 floats
(800 MB for vit_b), and adding the decomposed relative positions to it broadcasts
along its innermost axis, which CPUs do element by element. On a 2-core CPU that add
alone was ~60% of vit_b's encoder time. Here the same operations run on cache-sized
pieces of the logits (a few windows, or a few rows of queries of one head), in the
same order and with the same kernels, so every value keeps its bits: floating-point
addition, softmax and the rows of a matrix product do not depend on how many other
rows are computed with them.
"""

from __future__ import annotations

import torch
from segment_anything import SamPredictor
from segment_anything.modeling.image_encoder import (
    Attention,
    Block,
    ImageEncoderViT,
    get_rel_pos,
    window_partition,
    window_unpartition,
)

_LOGITS_PER_PIECE = 1 << 20  # attention logits computed at once: 4 MB of float32


def encode_image(encoder: torch.nn.Module, images: torch.Tensor, *, in_pieces: bool = True):
    """Image embeddings of preprocessed ``images``, a ViT's computed in pieces when
    ``in_pieces`` (the engine's CPU layout, ``amg.tuned_for``). Other encoders (MobileSAM's
    TinyViT), and a ViT laid out for a GPU, run as they are: the pieces are sized for CPU
    caches, and on a GPU they would only add kernel launches.
    """
    if not in_pieces or not isinstance(encoder, ImageEncoderViT):
        return encoder(images)
    return encode_vit(encoder, images)[0]


def encode_vit(encoder: torch.nn.Module, images: torch.Tensor):
    """A ViT encoder's embedding and its global-attention blocks' outputs (which HQ-SAM's
    copy of the ViT returns beside it), the attention run in pieces."""
    x = encoder.patch_embed(images)
    if encoder.pos_embed is not None:
        x = x + encoder.pos_embed
    global_outputs = []
    for block in encoder.blocks:
        x = _block(block, x)
        if block.window_size == 0:
            global_outputs.append(x)
    return encoder.neck(x.permute(0, 3, 1, 2)), global_outputs


class EncoderPredictor(SamPredictor):
    """``SamPredictor`` whose image embedding comes from :func:`encode_image`, in pieces
    while ``in_pieces`` (the engine sets it for each image)."""

    in_pieces = True

    @torch.no_grad()
    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size) -> None:
        size = self.model.image_encoder.img_size
        if transformed_image.ndim != 4 or max(*transformed_image.shape[2:]) != size:
            raise ValueError(
                f"expected a 1x3xHxW image with long side {size}, "
                f"got shape {tuple(transformed_image.shape)}"
            )
        self.reset_image()
        self.original_size = original_image_size
        self.input_size = tuple(transformed_image.shape[-2:])
        self.features = encode_image(
            self.model.image_encoder,
            self.model.preprocess(transformed_image),
            in_pieces=self.in_pieces,
        )
        self.is_image_set = True


def _block(block: Block, x: torch.Tensor) -> torch.Tensor:
    shortcut = x
    x = block.norm1(x)
    if block.window_size > 0:
        height, width = x.shape[1], x.shape[2]
        x, padded = window_partition(x, block.window_size)
    x = _attention(block.attn, x)
    if block.window_size > 0:
        x = window_unpartition(x, block.window_size, padded, (height, width))
    x = shortcut + x
    return x + block.mlp(block.norm2(x))


def _attention(module: Attention, x: torch.Tensor) -> torch.Tensor:
    batch, height, width, _ = x.shape
    heads, tokens = module.num_heads, height * width
    qkv = module.qkv(x).reshape(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, batch * heads, tokens, -1).unbind(0)
    scaled_q, k_t = q * module.scale, k.transpose(-2, -1)
    if module.use_rel_pos:
        rel_h, rel_w = _relative_positions(module, q, height, width)
    out = torch.empty_like(q)
    maps_per_piece = max(1, _LOGITS_PER_PIECE // (tokens * tokens))
    rows_per_piece = tokens if maps_per_piece > 1 else _whole_rows(tokens, width)
    for b0 in range(0, batch * heads, maps_per_piece):
        b1 = min(b0 + maps_per_piece, batch * heads)
        for r0 in range(0, tokens, rows_per_piece):
            r1 = min(r0 + rows_per_piece, tokens)
            attn = scaled_q[b0:b1, r0:r1] @ k_t[b0:b1]
            if module.use_rel_pos:
                grid = attn.view(b1 - b0, (r1 - r0) // width, width, height, width)
                h0, h1 = r0 // width, r1 // width
                grid = grid + rel_h[b0:b1, h0:h1, :, :, None] + rel_w[b0:b1, h0:h1, :, None, :]
                attn = grid.view(b1 - b0, r1 - r0, tokens)
            out[b0:b1, r0:r1] = attn.softmax(dim=-1) @ v[b0:b1]
    x = out.view(batch, heads, height, width, -1).permute(0, 2, 3, 1, 4)
    return module.proj(x.reshape(batch, height, width, -1))


def _whole_rows(tokens: int, width: int) -> int:
    """Query rows per piece of one attention map: whole image rows, so that the relative
    position terms, which are per image row, slice cleanly.
    """
    image_rows = max(1, _LOGITS_PER_PIECE // tokens // width)
    return image_rows * width


def _relative_positions(module: Attention, q: torch.Tensor, height: int, width: int):
    """The decomposed relative-position terms, as ``add_decomposed_rel_pos`` computes them."""
    r_q = q.reshape(q.shape[0], height, width, q.shape[-1])
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, get_rel_pos(height, height, module.rel_pos_h))
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, get_rel_pos(width, width, module.rel_pos_w))
    return rel_h, rel_w
