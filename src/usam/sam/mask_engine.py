"""SAM's automatic mask generation, exactly as the official generator, faster, with mask tokens.

The kept masks, boxes, predicted IoUs and stability scores equal those of
``segment_anything.SamAutomaticMaskGenerator.generate`` with the same weights and
settings (masks bit-identical, same order) on one CPU thread. With more threads the
BLAS splits matrix products according to their shapes, so that even the official
output changes with the thread count (vit_b's image embedding by up to ~4e-6 between
one and two threads); for exact output on several cores, run one single-threaded
process per core (``extract.trainer.devices=N extract.trainer.strategy=ddp``).

Each mask also carries the four mask tokens of its point prompt (the two-way
transformer output ``hs[:, 1:5]``, before the hypernetwork MLPs) flattened to 1024
values, which is what U-SAM classifies.

Where the time goes and what is done about it, without changing a single value:

* The image encoder computes its attention in cache-sized pieces
  (``usam.sam.image_encoder``), about 3x faster than the official one on a CPU.
* The mask decoder's image-side work (4096 x 256 values per point for the 1024-pixel
  models) is memory-bound; it runs one point at a time so that it stays in cache, while
  the token-side layers still see the whole point batch, because small matrix products
  are not bit-identical across batch sizes on CPU BLAS. Until the first image-to-token
  attention every point sees the same image keys, so their projections are computed
  once per image, not once per point. The per-point products are written into buffers
  reused from point to point, and the upscaling runs two points at a time, which keeps
  every temporary under glibc's mmap threshold: fresh pages cost page faults that, on a
  virtual machine, took as long as the arithmetic.
* Predicted IoU comes from the transformer alone, so the IoU filter runs first: mask
  upscaling inside the decoder and the upsampling to image size are done only for the
  masks that pass it. Stability is still computed on the full-resolution logits, as
  the official code does, so it stays exact.
* Masks are encoded with pycocotools' C RLE encoder instead of Python-level torch code,
  and nothing is deep-copied.

Point grids, crop boxes and the small-region cleanup come from ``segment_anything``
itself, so the geometry cannot drift from the official generator.

``AmgSettings(approximate=True)`` trades exactness for speed; the masks and scores then
only agree with the official ones closely (``benchmarks/extract_speed.py --approximate``
measures how closely):

* Attention over per-point image keys folds the projections into the few token-side
  vectors, e.g. ``softmax(q (X Wk)^T) (X Wv) = (softmax((q Wk) X^T) X) Wv``, which is
  about half the multiply-adds; the softmax over the 7 tokens runs along rows of 4096.
* Stability is scored on the 256 x 256 low-resolution logits, so masks that fail the
  stability filter are never upsampled; the kept masks carry that score.
* The upscaling's LayerNorm2d runs as one channels-last ``layer_norm``.
* On CUDA the decoder runs under bf16 autocast (not yet measured on a GPU).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from segment_anything.modeling import Sam
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.utils.amg import (
    build_all_layer_point_grids,
    generate_crop_boxes,
    remove_small_regions,
)
from torchvision.ops.boxes import batched_nms, box_area

from usam.formats.embedding_shards import ImageRecord
from usam.sam.amg_settings import AmgSettings
from usam.sam.image_encoder import EncoderPredictor

_EDGE_TOLERANCE = 20.0  # pixels, as in the official crop-edge filter
_UPSAMPLE_CHUNK = 2  # full-resolution masks held at once (under glibc's mmap threshold)
_UPSCALE_CHUNK = 2  # points per pass of the decoder's transposed convolutions: fastest on CPU
# Devices whose decoder runs under bf16 autocast in approximate mode. Not CPU: even with
# AMX bf16 units (vit_b, 16x16 points) it saved only 6% of the decoder time, the rest being
# casts and element-wise work, for ~10x larger score differences.
_AUTOCAST_DEVICE_TYPES = frozenset({"cuda"})


@dataclass
class ImageMasks:
    """The kept masks of one image, in the official generator's order."""

    height: int
    width: int
    rles: list[str]  # COCO compressed RLE counts; size is (height, width)
    boxes: np.ndarray  # (N, 4) int64 XYWH, as the official ``bbox``
    areas: np.ndarray  # (N,) int64
    iou_preds: np.ndarray  # (N,) float32
    stability: np.ndarray  # (N,) float32
    points: np.ndarray  # (N, 2) float64 (x, y) in image pixels
    multimask: np.ndarray  # (N,) int8: which multimask output (0..2); token index is +1
    tokens: np.ndarray  # (N, 1024) float32: the 4 mask tokens of the mask's point

    def __len__(self) -> int:
        return len(self.rles)

    def to_record(
        self,
        key: str,
        *,
        labels: list[int] | None = None,
        ground_truth: dict[str, Any] | None = None,
        source: dict[str, Any] | None = None,
    ) -> ImageRecord:
        return ImageRecord(
            key=key,
            height=self.height,
            width=self.width,
            embeddings=self.tokens.astype(np.float16),
            iou_preds=self.iou_preds.astype(np.float32),
            stability=self.stability.astype(np.float32),
            boxes=self.boxes.astype(np.float32),
            points=self.points.astype(np.float32),
            multimask=self.multimask.astype(np.int8),
            rles=list(self.rles),
            labels=labels,
            ground_truth=ground_truth,
            source=dict(source or {}),
        )


@dataclass
class _Candidates:
    """Masks of one crop that passed the per-batch filters (crop frame, not yet deduplicated)."""

    rles: list[str]
    boxes: torch.Tensor  # (N, 4) int64 XYXY in the crop frame
    areas: torch.Tensor
    iou_preds: torch.Tensor
    stability: torch.Tensor
    points: torch.Tensor  # float64, crop frame
    multimask: torch.Tensor
    tokens: torch.Tensor

    @staticmethod
    def cat(parts: list[_Candidates]) -> _Candidates:
        fields = {}
        for name in _Candidates.__dataclass_fields__:
            values = [getattr(p, name) for p in parts]
            fields[name] = sum(values, []) if name == "rles" else torch.cat(values)
        return _Candidates(**fields)

    def select(self, keep: torch.Tensor) -> _Candidates:
        keep = keep.cpu()
        if keep.dtype == torch.bool:
            keep = keep.nonzero().flatten()
        fields = {
            name: [value[i] for i in keep.tolist()] if name == "rles" else value[keep]
            for name, value in vars(self).items()
        }
        return _Candidates(**fields)


def _empty_candidates(token_dim: int) -> _Candidates:
    return _Candidates(
        rles=[],
        boxes=torch.zeros(0, 4, dtype=torch.int64),
        areas=torch.zeros(0, dtype=torch.int64),
        iou_preds=torch.zeros(0),
        stability=torch.zeros(0),
        points=torch.zeros(0, 2, dtype=torch.float64),
        multimask=torch.zeros(0, dtype=torch.int8),
        tokens=torch.zeros(0, token_dim),
    )


class _ImageSide:
    """What the decoder's per-point image-side work reuses from point to point.

    The dense positional encoding comes in the official layout, for the products that
    all points share (they must see the very layout the official code gives them), and
    contiguous, for the per-point sums. The per-point 4096 x 256 products are written
    into buffers reused from point to point: fresh memory for each of them costs page
    faults, on a virtual machine about as much as the arithmetic. The same kernels write
    the same values either way.
    """

    def __init__(self, key_pe: torch.Tensor) -> None:
        # Made and used under inference mode only (``generate``), which forbids mixing.
        self.key_pe = key_pe
        self.key_pe_flat = key_pe.contiguous()
        self._buffers: dict[tuple, torch.Tensor] = {}

    def buffer(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        key = (name, tuple(shape), like.dtype)
        if key not in self._buffers:
            self._buffers[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return self._buffers[key]

    def layer_keys(self, layer: int, chunks: list[torch.Tensor]) -> torch.Tensor:
        """Where a layer's updated image keys of all the points of a batch go: they outlive
        the point that computed them, so each layer keeps its own.
        """
        total = sum(len(chunk) for chunk in chunks)
        return self.buffer(f"keys{layer}", (total, *chunks[0].shape[1:]), chunks[0])

    def with_pe(self, keys: torch.Tensor) -> torch.Tensor:
        """``keys + key_pe``."""
        return torch.add(keys, self.key_pe_flat, out=self.buffer("with_pe", keys.shape, keys))

    def linear(self, name: str, linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """``linear(x)`` for contiguous ``x``: the ``addmm`` that ``F.linear`` calls."""
        out = self.buffer(name, (*x.shape[:-1], linear.out_features), x)
        flat = out.view(-1, linear.out_features)
        torch.addmm(linear.bias, x.view(-1, x.shape[-1]), linear.weight.t(), out=flat)
        return out

    def attend(self, attn: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``_recombine_heads(attn @ v)``: the ``bmm`` that ``matmul`` calls, then the heads
        side by side.
        """
        batch, heads, rows, _ = attn.shape
        mixed = self.buffer("mixed", (batch * heads, rows, v.shape[-1]), attn)
        torch.bmm(
            attn.reshape(batch * heads, rows, -1),
            v.reshape(batch * heads, -1, v.shape[-1]),
            out=mixed,
        )
        out = self.buffer("attended", (batch, rows, heads * v.shape[-1]), attn)
        out.view(batch, rows, heads, -1).copy_(mixed.view(batch, heads, rows, -1).transpose(1, 2))
        return out


def _attention_core(module, q, k, v, side: _ImageSide | None = None) -> torch.Tensor:
    """The official ``Attention.forward`` between the input projections and ``out_proj``;
    with ``side``, its large products go into that image's reused buffers.
    """
    q = module._separate_heads(q, module.num_heads)
    k = module._separate_heads(k, module.num_heads)
    v = module._separate_heads(v, module.num_heads)
    attn = q @ k.permute(0, 1, 3, 2)
    attn = attn / math.sqrt(q.shape[-1])
    attn = torch.softmax(attn, dim=-1)
    return module._recombine_heads(attn @ v) if side is None else side.attend(attn, v)


class _SameInput:
    """``fn``, evaluated again only when given another tensor than the last time.

    Until the first image-to-token attention every point sees the very same image keys,
    so their projections are computed once per image instead of once per point.
    """

    def __init__(self, fn) -> None:
        self.fn, self.last, self.value = fn, None, None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x is not self.last:
            self.last, self.value = x, self.fn(x)
        return self.value


def _tokens_to_image(module, q_tokens, chunks, side: _ImageSide, *, shared: bool):
    """Tokens attend to the image: token-side projections on the whole batch. ``shared``:
    all points see the same image keys, so their projections are computed once.
    """
    q = module.q_proj(q_tokens)
    if shared:
        k = _SameInput(lambda keys: module.k_proj(keys + side.key_pe))
        v = _SameInput(module.v_proj)
    else:
        k = lambda keys: side.linear("k", module.k_proj, side.with_pe(keys))  # noqa: E731
        v = lambda keys: side.linear("v", module.v_proj, keys)  # noqa: E731
    outs, start = [], 0
    for keys in chunks:
        stop = start + keys.shape[0]
        outs.append(_attention_core(module, q[start:stop], k(keys), v(keys)))
        start = stop
    return module.out_proj(torch.cat(outs))


def _image_to_tokens(module, norm, chunks, side, k_tokens, v_tokens, *, layer: int):
    """The image attends to the tokens, chunk by chunk; returns the updated image keys."""
    shared = layer == 0
    k = module.k_proj(k_tokens)
    v = module.v_proj(v_tokens)
    if shared:
        q = _SameInput(lambda keys: module.q_proj(keys + side.key_pe))
        residual = _SameInput(torch.Tensor.contiguous)  # the shared keys are a transposed view
    else:
        q = lambda keys: side.linear("q", module.q_proj, side.with_pe(keys))  # noqa: E731
        residual = lambda keys: keys  # noqa: E731
    store, updated, start = side.layer_keys(layer, chunks), [], 0
    for keys in chunks:
        stop = start + keys.shape[0]
        attended = _attention_core(module, q(keys), k[start:stop], v[start:stop], side)
        out = side.linear("out", module.out_proj, attended)
        updated.append(store[start:stop].copy_(norm(out.add_(residual(keys)))))  # keys + out
        start = stop
    return updated


def _heads(linear: torch.nn.Linear, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A projection's weight as (heads, head_dim, in) and bias as (heads, head_dim)."""
    out_features, in_features = linear.weight.shape
    head_dim = out_features // num_heads
    return (
        linear.weight.view(num_heads, head_dim, in_features),
        linear.bias.view(num_heads, head_dim),
    )


def _tokens_to_image_folded(module, q_tokens, chunks, side: _ImageSide) -> torch.Tensor:
    """``_tokens_to_image`` for per-point image keys, with the key and value projections
    moved to the token side: ``q (X Wk + bk)^T = (q Wk) X^T + const`` (a per-row constant
    that softmax drops) and ``A (X Wv + bv) = (A X) Wv + bv`` (rows of A sum to one).
    """
    heads = module.num_heads
    w_k, _ = _heads(module.k_proj, heads)
    w_v, b_v = _heads(module.v_proj, heads)
    q = module.q_proj(q_tokens)
    batch, n_tokens, _ = q.shape
    q = q.view(batch, n_tokens, heads, -1)
    q_k = torch.einsum("bthd,hdc->bhtc", q / math.sqrt(q.shape[-1]), w_k).flatten(1, 2)
    outs, start = [], 0
    for keys in chunks:
        stop = start + keys.shape[0]
        attn = torch.softmax(q_k[start:stop] @ side.with_pe(keys).transpose(1, 2), dim=-1)
        mixed = (attn @ keys).view(stop - start, heads, n_tokens, -1)
        outs.append(torch.einsum("bhtc,hdc->bthd", mixed, w_v) + b_v)
        start = stop
    return module.out_proj(torch.cat(outs).flatten(2))


def _image_to_tokens_folded(module, norm, chunks, side, k_tokens, v_tokens, *, layer: int):
    """``_image_to_tokens`` with the output projection folded into the token values,
    ``sum_h A_h (v_h Wo_h^T) + bo``, and the softmax over the tokens computed along rows
    of image positions. In the first layer all points see the same image keys, so their
    query projection is computed once; otherwise it is folded into the token keys too,
    ``(X Wq + bq) k^T = X (Wq^T k^T) + bq k^T``.
    """
    heads, shared = module.num_heads, layer == 0
    k = module.k_proj(k_tokens)
    v = module.v_proj(v_tokens)
    batch, n_tokens, _ = k.shape
    k = k.view(batch, n_tokens, heads, -1)
    k = k / math.sqrt(k.shape[-1])
    w_out = module.out_proj.weight
    values = torch.einsum(
        "bthd,chd->bhtc", v.view(batch, n_tokens, heads, -1), w_out.view(w_out.shape[0], heads, -1)
    ).flatten(1, 2)
    if shared:
        q = _SameInput(lambda keys: module.q_proj(keys + side.key_pe))
        k = k.permute(0, 2, 1, 3)  # (batch, heads, tokens, head_dim)
    else:
        w_q, b_q = _heads(module.q_proj, heads)
        k_q = torch.einsum("bthd,hdc->bhtc", k, w_q).flatten(1, 2)
        bias = torch.einsum("bthd,hd->bht", k, b_q).flatten(1)[:, :, None]
    store, updated, start = side.layer_keys(layer, chunks), [], 0
    for keys in chunks:
        stop, n = start + keys.shape[0], keys.shape[0]
        if shared:
            q_heads = q(keys).view(n, -1, heads, k.shape[-1]).permute(0, 2, 3, 1)
            logits = k[start:stop] @ q_heads
        else:
            logits = torch.baddbmm(
                bias[start:stop], k_q[start:stop], side.with_pe(keys).transpose(1, 2)
            )
        attn = torch.softmax(logits.view(n, heads, n_tokens, -1), dim=2).view(
            n, heads * n_tokens, -1
        )
        out = torch.baddbmm(module.out_proj.bias, attn.transpose(1, 2), values[start:stop])
        updated.append(store[start:stop].copy_(norm(keys + out)))
        start = stop
    return updated


def _two_way_block(block, queries, chunks, query_pe, side, *, folded: bool, index: int):
    """The ``index``-th ``TwoWayAttentionBlock``; ``folded`` for approximate mode. In the
    first one all points see the same image keys.
    """
    if block.skip_first_layer_pe:
        queries = block.self_attn(q=queries, k=queries, v=queries)
    else:
        q = queries + query_pe
        queries = queries + block.self_attn(q=q, k=q, v=queries)
    queries = block.norm1(queries)
    attn = _to_image(
        block.cross_attn_token_to_image,
        queries + query_pe,
        chunks,
        side,
        folded=folded,
        shared=index == 0,
    )
    queries = block.norm2(queries + attn)
    queries = block.norm3(queries + block.mlp(queries))
    to_tokens = _image_to_tokens_folded if folded else _image_to_tokens
    chunks = to_tokens(
        block.cross_attn_image_to_token,
        block.norm4,
        chunks,
        side,
        queries + query_pe,
        queries,
        layer=index,
    )
    return queries, chunks


def _to_image(module, q_tokens, chunks, side, *, folded: bool, shared: bool) -> torch.Tensor:
    """Token-to-image attention; with shared keys the exact form, which projects them once
    per image, is the cheaper one in approximate mode too.
    """
    if folded and not shared:
        return _tokens_to_image_folded(module, q_tokens, chunks, side)
    return _tokens_to_image(module, q_tokens, chunks, side, shared=shared)


def _upscale(upscaling: torch.nn.Sequential, src: torch.Tensor, folded: bool) -> torch.Tensor:
    """The decoder's ``output_upscaling``. Its LayerNorm2d runs over the first convolution's
    output in place: in exact mode as the official operations in their order, without
    their five temporaries; in approximate mode as one ``layer_norm`` over channels-last
    memory, about 3x faster on CPU than the five passes.
    """
    if len(upscaling) != 5 or not isinstance(upscaling[1], LayerNorm2d):
        return upscaling(src)
    conv1, norm, act1, conv2, act2 = upscaling
    x = conv1(src)
    if folded:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps).permute(0, 3, 1, 2)
    else:
        x = x.sub_(x.mean(1, keepdim=True))  # x - u, which the official code computes twice
        x = x.div_(torch.sqrt(x.pow(2).mean(1, keepdim=True) + norm.eps))
        x = x.mul_(norm.weight[:, None, None]).add_(norm.bias[:, None, None])
    return act2(conv2(act1(x)))


class AutomaticMaskEngine:
    """Automatic masks plus mask tokens for one image at a time.

    ``decoder_chunk`` is how many points share one pass of the decoder's image-side
    work. One is fastest on CPU; on a GPU a larger chunk saves kernel launches. The
    output equals the official one as long as the BLAS gives a row of a large matrix
    product the same bits whatever the number of rows, which the tests check here.
    """

    def __init__(self, sam: Sam, settings: AmgSettings | None = None, *, decoder_chunk: int = 1):
        self.sam = sam.eval()
        self.settings = settings or AmgSettings()
        self.decoder_chunk = decoder_chunk
        self.predictor = EncoderPredictor(sam)
        self._side: _ImageSide | None = None
        # Wall seconds of the last ``generate`` by stage: encoder, decoder (the mask
        # decoder and its upscaling), post-processing (the rest).
        self.stage_seconds: dict[str, float] = {}
        s = self.settings
        self.point_grids = build_all_layer_point_grids(
            s.points_per_side, s.crop_n_layers, s.crop_n_points_downscale_factor
        )

    @property
    def token_dim(self) -> int:
        decoder = self.sam.mask_decoder
        return decoder.num_mask_tokens * decoder.transformer_dim

    @torch.inference_mode()
    def generate(self, image: np.ndarray) -> ImageMasks:
        """Masks of an HWC uint8 RGB image."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"expected an HxWx3 uint8 RGB image, got shape {image.shape} dtype {image.dtype}"
            )
        start = time.perf_counter()
        self.stage_seconds = {"encoder": 0.0, "decoder": 0.0}
        s = self.settings
        height, width = image.shape[:2]
        crop_boxes, layer_idxs = generate_crop_boxes(
            (height, width), s.crop_n_layers, s.crop_overlap_ratio
        )
        parts = [
            self._process_crop(image, box, layer) for box, layer in zip(crop_boxes, layer_idxs)
        ]
        data = _Candidates.cat(parts)
        if len(crop_boxes) > 1:
            crop_of_mask = [box for box, part in zip(crop_boxes, parts) for _ in part.rles]
            scores = 1 / box_area(torch.tensor(crop_of_mask, dtype=torch.int64).reshape(-1, 4))
            keep = batched_nms(
                data.boxes.float(), scores, torch.zeros(len(data.rles)), s.crop_nms_thresh
            )
            data = data.select(keep)
        if s.min_mask_region_area > 0:
            data = self._remove_small_regions(data, height, width)
        xywh = data.boxes.clone()
        xywh[:, 2:] -= xywh[:, :2]
        elapsed = time.perf_counter() - start
        self.stage_seconds["post-processing"] = elapsed - sum(self.stage_seconds.values())
        return ImageMasks(
            height=height,
            width=width,
            rles=data.rles,
            boxes=xywh.numpy(),
            areas=data.areas.numpy(),
            iou_preds=data.iou_preds.numpy(),
            stability=data.stability.numpy(),
            points=data.points.numpy(),
            multimask=data.multimask.numpy(),
            tokens=data.tokens.float().numpy(),
        )

    @contextmanager
    def _clock(self, stage: str):
        """Adds the wall time of the block to ``stage_seconds[stage]``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.predictor.device.type == "cuda":
                torch.cuda.synchronize()
            self.stage_seconds[stage] += time.perf_counter() - start

    @torch.inference_mode()
    def point_ious(self, image: np.ndarray) -> np.ndarray:
        """Predicted IoU of every multimask output on the full-image grid, before any filter.

        For choosing ``pred_iou_thresh`` by the share of masks it lets through.
        """
        self.predictor.set_image(image)
        points = self.point_grids[0] * np.array(image.shape[:2])[None, ::-1]
        step = self.settings.points_per_batch
        ious = [
            self._decode(points[i : i + step], image.shape[:2])[0].flatten().cpu()
            for i in range(0, len(points), step)
        ]
        self.predictor.reset_image()
        return torch.cat(ious).numpy()

    def _process_crop(self, image, crop_box, layer_idx) -> _Candidates:
        x0, y0, x1, y1 = crop_box
        crop = image[y0:y1, x0:x1, :]
        crop_size = crop.shape[:2]
        with self._clock("encoder"):
            self.predictor.set_image(crop)
        points = self.point_grids[layer_idx] * np.array(crop_size)[None, ::-1]
        step = self.settings.points_per_batch
        parts = [
            self._process_batch(points[i : i + step], crop_size, crop_box, image.shape[:2])
            for i in range(0, len(points), step)
        ]
        self.predictor.reset_image()
        data = _Candidates.cat([_empty_candidates(self.token_dim), *parts])
        keep = batched_nms(
            data.boxes.float(),
            data.iou_preds,
            torch.zeros(len(data.rles)),
            iou_threshold=self.settings.box_nms_thresh,
        )
        data = data.select(keep)
        data.boxes = data.boxes + torch.tensor([[x0, y0, x0, y0]])
        data.points = data.points + torch.tensor([[x0, y0]])
        return data

    def _decode(self, points: np.ndarray, crop_size):
        """The official mask decoder, restructured; returns IoU, mask tokens and a mask maker."""
        sam, predictor = self.sam, self.predictor
        decoder = sam.mask_decoder
        coords = torch.as_tensor(
            predictor.transform.apply_coords(points, crop_size), device=predictor.device
        )
        labels = torch.ones(coords.shape[0], dtype=torch.int, device=coords.device)
        sparse, dense = sam.prompt_encoder(
            points=(coords[:, None, :], labels[:, None]), boxes=None, masks=None
        )
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(sparse.size(0), -1, -1), sparse), 1)
        features = predictor.features
        _, c, h, w = features.shape
        side = self._image_side()
        step = self.decoder_chunk
        sizes = [min(step, tokens.shape[0] - i) for i in range(0, tokens.shape[0], step)]
        initial = {n: (features + dense[:n]).flatten(2).permute(0, 2, 1) for n in set(sizes)}
        chunks = [initial[n] for n in sizes]
        transformer = decoder.transformer
        folded = self.settings.approximate
        low_precision = self._low_precision(features.device)
        with low_precision():
            queries = tokens
            for i, layer in enumerate(transformer.layers):
                queries, chunks = _two_way_block(
                    layer, queries, chunks, tokens, side, folded=folded, index=i
                )
            attn = _to_image(
                transformer.final_attn_token_to_image,
                queries + tokens,
                chunks,
                side,
                folded=folded,
                shared=False,
            )
            hs = transformer.norm_final_attn(queries + attn)
            iou_preds = decoder.iou_prediction_head(hs[:, 0, :])
            mask_tokens = hs[:, 1 : 1 + decoder.num_mask_tokens, :]
            hyper_in = torch.stack(
                [
                    mlp(mask_tokens[:, i, :])
                    for i, mlp in enumerate(decoder.output_hypernetworks_mlps)
                ],
                dim=1,
            )

        def low_res_masks(point_idx: torch.Tensor) -> torch.Tensor:
            """Multimask low-res logits (len(point_idx), 3, h', w') for some of the points."""
            out = []
            for i in range(0, len(point_idx), _UPSCALE_CHUNK):
                idx = point_idx[i : i + _UPSCALE_CHUNK]
                # A lone point takes other convolution and product kernels than a batch
                # does, with other rounding: it is paired with itself, unless the
                # official decoder sees it alone too.
                lone = len(idx) == 1 and len(tokens) > 1
                if lone:
                    idx = idx.repeat(2)
                keys = torch.cat([chunks[j // step][j % step : j % step + 1] for j in idx.tolist()])
                src = keys.transpose(1, 2).view(len(idx), c, h, w)
                with low_precision():
                    upscaled = _upscale(decoder.output_upscaling, src, folded)
                    n, cu, hu, wu = upscaled.shape
                    masks = (hyper_in[idx] @ upscaled.view(n, cu, hu * wu)).view(n, -1, hu, wu)
                out.append(masks[: 1 if lone else n, 1:].float())
            return torch.cat(out)

        return iou_preds[:, 1:].float(), mask_tokens.flatten(1).float(), low_res_masks

    def _image_side(self) -> _ImageSide:
        """The decoder's reused image-side state; the positional encoding is the model's."""
        if self._side is None:
            key_pe = self.sam.prompt_encoder.get_dense_pe().flatten(2).permute(0, 2, 1)
            self._side = _ImageSide(key_pe)
        return self._side

    def _low_precision(self, device: torch.device):
        """A context factory: bf16 autocast in approximate mode on the devices that get it."""
        if self.settings.approximate and device.type in _AUTOCAST_DEVICE_TYPES:
            return partial(torch.autocast, device.type, dtype=torch.bfloat16)
        return nullcontext

    def _process_batch(self, points, crop_size, crop_box, orig_size) -> _Candidates:
        s = self.settings
        with self._clock("decoder"):
            iou_preds, tokens, low_res_masks = self._decode(points, crop_size)
        n_out = iou_preds.shape[1]
        flat_iou = iou_preds.flatten()
        if s.pred_iou_thresh > 0.0:
            keep = (flat_iou > s.pred_iou_thresh).nonzero().flatten()
        else:
            keep = torch.arange(flat_iou.numel(), device=flat_iou.device)
        parts = [_empty_candidates(self.token_dim)]
        if len(keep):
            point_idx, inverse = torch.unique(keep // n_out, return_inverse=True)
            with self._clock("decoder"):
                low_res = low_res_masks(point_idx)[inverse, keep % n_out]
            low_res_stability = None
            if s.approximate:
                low_res_stability = self._low_res_stability(low_res)
                if s.stability_score_thresh > 0.0:
                    passed = low_res_stability >= s.stability_score_thresh
                    low_res, keep = low_res[passed], keep[passed]
                    low_res_stability = low_res_stability[passed]
            for i in range(0, len(keep), _UPSAMPLE_CHUNK):
                part = self._finish_masks(
                    low_res[i : i + _UPSAMPLE_CHUNK],
                    keep[i : i + _UPSAMPLE_CHUNK],
                    n_out,
                    flat_iou,
                    tokens,
                    points,
                    crop_box,
                    orig_size,
                    None
                    if low_res_stability is None
                    else low_res_stability[i : i + _UPSAMPLE_CHUNK],
                )
                parts.append(part)
        return _Candidates.cat(parts)

    def _low_res_stability(self, low_res: torch.Tensor) -> torch.Tensor:
        """Stability scores of low-res logits, over the part of them that covers the image."""
        scale = low_res.shape[-1] / self.predictor.transform.target_length
        h, w = (math.ceil(side * scale) for side in self.predictor.input_size)
        return _stability(
            low_res[:, :h, :w], self.sam.mask_threshold, self.settings.stability_score_offset
        )

    def _finish_masks(
        self, low_res, sel, n_out, flat_iou, tokens, points, crop_box, orig_size, stability=None
    ) -> _Candidates:
        """Upsample, stability filter, binarise, box, crop-edge filter, RLE: survivors only.

        ``stability``: scores already computed and filtered on (approximate mode).
        """
        s, sam, predictor = self.settings, self.sam, self.predictor
        logits = sam.postprocess_masks(
            low_res[:, None], predictor.input_size, predictor.original_size
        )[:, 0]
        threshold = sam.mask_threshold
        keep = torch.ones(len(logits), dtype=torch.bool, device=logits.device)
        if stability is None:
            stability = _stability(logits, threshold, s.stability_score_offset)
            if s.stability_score_thresh > 0.0:
                keep = stability >= s.stability_score_thresh
        masks = logits[keep] > threshold
        boxes = _mask_boxes(masks)
        edge = _near_crop_edge(boxes, crop_box, orig_size)
        if edge is not None:
            keep[keep.clone()] = ~edge
            masks, boxes = masks[~edge], boxes[~edge]
        sel, stability = sel[keep], stability[keep]
        point_of = (sel // n_out).cpu()
        return _Candidates(
            rles=_encode_rles(masks, crop_box, orig_size),
            boxes=boxes.cpu(),
            areas=masks.sum((-2, -1)).cpu(),
            iou_preds=flat_iou[sel].cpu(),
            stability=stability.cpu(),
            points=torch.as_tensor(points)[point_of],
            multimask=(sel % n_out).to(torch.int8).cpu(),
            tokens=tokens[point_of.to(tokens.device)].cpu(),
        )

    def _remove_small_regions(self, data: _Candidates, height: int, width: int) -> _Candidates:
        """The official cleanup: fill small holes, drop small islands, re-run box NMS."""
        s = self.settings
        if not data.rles:
            return data
        masks, scores = [], []
        for counts in data.rles:
            rle = {"size": [height, width], "counts": counts}
            mask = np.ascontiguousarray(mask_utils.decode(rle), dtype=bool)
            mask, filled = remove_small_regions(mask, s.min_mask_region_area, mode="holes")
            mask, dropped = remove_small_regions(mask, s.min_mask_region_area, mode="islands")
            masks.append(torch.as_tensor(mask))
            scores.append(float(not (filled or dropped)))
        stacked = torch.stack(masks)
        boxes = _mask_boxes(stacked)
        keep = batched_nms(
            boxes.float(),
            torch.as_tensor(scores),
            torch.zeros(len(boxes)),
            iou_threshold=max(s.box_nms_thresh, s.crop_nms_thresh),
        )
        for i in keep.tolist():
            if scores[i] == 0.0:
                whole = [0, 0, width, height]
                data.rles[i] = _encode_rles(stacked[i : i + 1], whole, (height, width))[0]
                data.boxes[i] = boxes[i]
                data.areas[i] = stacked[i].sum()
        return data.select(keep)


@dataclass(frozen=True)
class Agreement:
    """How closely one set of masks reproduces a reference set of the same images."""

    reference_masks: int
    other_masks: int
    matched: int  # reference masks with an other mask at mask IoU >= min_iou
    same_prompt: int  # matched pairs that also share point and multimask output
    max_iou_pred_diff: float  # over matched pairs
    max_stability_diff: float

    @property
    def matched_share(self) -> float:
        return self.matched / self.reference_masks if self.reference_masks else 1.0


def agreement(
    reference: list[ImageMasks], other: list[ImageMasks], min_iou: float = 0.95
) -> Agreement:
    """Match each reference mask to an other mask of the same image at mask IoU >= ``min_iou``,
    the one from the same point and multimask output when that qualifies, else the closest,
    so that score differences compare like with like even among near-duplicate masks.
    """
    matched = same_prompt = 0
    iou_diff = stability_diff = 0.0
    for ref, oth in zip(reference, other, strict=True):
        if not len(ref) or not len(oth):
            continue
        size = [ref.height, ref.width]
        ious = mask_utils.iou(
            [{"size": size, "counts": c} for c in ref.rles],
            [{"size": size, "counts": c} for c in oth.rles],
            [0] * len(oth),
        )
        prompt = (ref.points[:, None] == oth.points[None]).all(-1) & (
            ref.multimask[:, None] == oth.multimask[None]
        )
        for i, row in enumerate(ious):
            ok = row >= min_iou
            if not ok.any():
                continue
            same = ok & prompt[i]
            j = int(same.argmax()) if same.any() else int(row.argmax())
            matched += 1
            same_prompt += bool(same.any())
            iou_diff = max(iou_diff, abs(float(ref.iou_preds[i]) - float(oth.iou_preds[j])))
            stability_diff = max(
                stability_diff, abs(float(ref.stability[i]) - float(oth.stability[j]))
            )
    return Agreement(
        reference_masks=sum(len(r) for r in reference),
        other_masks=sum(len(o) for o in other),
        matched=matched,
        same_prompt=same_prompt,
        max_iou_pred_diff=iou_diff,
        max_stability_diff=stability_diff,
    )


def _stability(logits: torch.Tensor, threshold: float, offset: float) -> torch.Tensor:
    """The official stability score: area above ``threshold + offset`` over area above
    ``threshold - offset``, per mask.
    """
    inter = (logits > threshold + offset).sum((-2, -1), dtype=torch.int32)
    union = (logits > threshold - offset).sum((-2, -1), dtype=torch.int32)
    return inter / union


def _mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """XYXY boxes (inclusive pixel edges, int64) of binary masks; zeros for empty masks."""
    n, h, w = masks.shape
    rows = masks.any(dim=2).to(torch.uint8)
    cols = masks.any(dim=1).to(torch.uint8)
    top = rows.argmax(dim=1)
    bottom = h - 1 - rows.flip(1).argmax(dim=1)
    left = cols.argmax(dim=1)
    right = w - 1 - cols.flip(1).argmax(dim=1)
    boxes = torch.stack([left, top, right, bottom], dim=1)
    return boxes * rows.any(dim=1, keepdim=True)


def _near_crop_edge(boxes, crop_box, orig_size) -> torch.Tensor | None:
    """Masks touching a crop border that is not an image border; None for the full image."""
    orig_h, orig_w = orig_size
    if list(crop_box) == [0, 0, orig_w, orig_h]:
        return None
    x0, y0 = crop_box[:2]
    crop = torch.tensor(crop_box, dtype=torch.float, device=boxes.device)
    image = torch.tensor([0, 0, orig_w, orig_h], dtype=torch.float, device=boxes.device)
    shifted = (boxes + torch.tensor([x0, y0, x0, y0], device=boxes.device)).float()
    near_crop = (shifted - crop).abs() <= _EDGE_TOLERANCE
    near_image = (shifted - image).abs() <= _EDGE_TOLERANCE
    return (near_crop & ~near_image).any(dim=1)


def _encode_rles(masks: torch.Tensor, crop_box, orig_size) -> list[str]:
    """COCO RLE counts of binary masks, placed into the full image when they come from a crop."""
    if len(masks) == 0:
        return []
    masks = masks.cpu()
    if list(crop_box) != [0, 0, orig_size[1], orig_size[0]]:
        x0, y0, x1, y1 = crop_box
        full = torch.zeros(len(masks), *orig_size, dtype=torch.bool)
        full[:, y0:y1, x0:x1] = masks
        masks = full
    # (N, W, H) C-order is (H, W, N) Fortran order, what pycocotools wants, without a copy.
    fortran = masks.transpose(1, 2).contiguous().numpy().view(np.uint8).transpose(2, 1, 0)
    return [rle["counts"].decode("ascii") for rle in mask_utils.encode(fortran)]
