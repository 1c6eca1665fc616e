"""The mask decoder's two-way transformer (SAM 1's and SAM 2's, which share its layout),
with its image side reordered to a third of the official multiply-adds.

The contract of ``usam.sam.mask_engine`` bounds results, not arithmetic, so products are
reassociated wherever that is exact in real arithmetic (float32 rounding moves by ~1e-7
relative, far inside the bounds):

* Until the first image-to-token attention every point sees the same image keys: their
  key, value and query projections are computed once per image, not once per point.
* Attention over a point's own image keys X (4096 x 256 for the 1024-pixel models)
  folds the projections into the 7 tokens (8 heads, 56 rows). Token to image:
  ``q (X Wk + bk)^T = (q Wk) X^T + const`` (a per-row constant that softmax drops) and
  ``A (X Wv + bv) = (A X) Wv + bv`` (rows of A sum to one). Image to token:
  ``(X Wq + bq) k^T = X (Wq^T k^T) + bq k^T`` and ``A v Wo = A (v Wo)``, so no 4096 x 256
  projection is ever formed: 117 MFLOP per product instead of 268.
* Softmax over the 7 tokens runs along rows of 4096 positions, where it vectorises, and
  the per-point 4096 x 256 results go into buffers reused from point to point (fresh
  memory for each costs page faults, on a virtual machine about as much as the
  arithmetic).

The token side (small products over 7 tokens) sees the whole point batch, as in the
official decoder; the image side runs ``chunk`` points at a time: one on a CPU, so that it
stays in cache, the whole batch on a GPU, so that each step is one kernel for all points.

Under bf16 autocast (``amg.precision: bf16``) the image side runs in bfloat16: the image
embedding, the dense prompt and the tokens are cast at the entry, and what autocast hands
back in float32 (a softmax or norm on a GPU) is cast again before it meets the reused
buffers. The image-side state is kept per device and dtype (:class:`ImageSides`), so an
engine whose model moves between devices, or whose precision changes, keeps working.
"""

from __future__ import annotations

import math

import torch


def compute_dtype(device: torch.device, stored: torch.dtype) -> torch.dtype:
    """The dtype the decoder runs in: autocast's where it is on for ``device``, else the
    ``stored`` one (the image embedding's)."""
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return stored


class ImageSides:
    """The :class:`ImageSide` of the device and dtype the decoder runs on now, made again
    when either changes: a side never meets tensors of another device or precision, and
    none holds memory on a device the model has left."""

    def __init__(self, dense_pe) -> None:
        self._dense_pe = dense_pe  # () -> (1, C, h, w): the model's, on its device
        self._key: tuple[torch.device, torch.dtype] | None = None
        self._side: ImageSide | None = None

    def get(self, device: torch.device, dtype: torch.dtype) -> ImageSide:
        if self._key != (device, dtype):
            dense_pe = self._dense_pe().to(device=device, dtype=dtype)  # autocast's, if on
            self._key = (device, dtype)
            self._side = ImageSide(dense_pe.flatten(2).permute(0, 2, 1))
        return self._side


class ImageSide:
    """What the decoder's image-side work reuses on one device in one dtype: the dense
    positional encoding, the first layer's projections of the image keys every point
    shares (until the image changes) and the per-point buffers.
    """

    def __init__(self, key_pe: torch.Tensor) -> None:
        # Made and used under inference mode only (``generate``), which forbids mixing.
        self.key_pe = key_pe.contiguous()  # (1, h * w, C)
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._image: torch.Tensor | None = None
        self._shared: dict[str, torch.Tensor] = {}
        self.initial: torch.Tensor | None = None  # (1, h * w, C): the first layer's keys

    def buffer(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        key = (name, tuple(shape), like.dtype)
        if key not in self._buffers:
            self._buffers[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return self._buffers[key]

    def set_image(self, features: torch.Tensor, dense: torch.Tensor) -> None:
        """The image embedding (1, C, H, W) and dense prompt embedding of the points to
        come, in this side's dtype; the first layer's shared work is kept while they stay
        the same."""
        if self._image is not features:
            self._image, self._shared = features, {}
            initial = (features + dense[:1]).to(self.key_pe.dtype)
            self.initial = initial.flatten(2).transpose(1, 2).contiguous()

    def shared(self, name: str, make) -> torch.Tensor:
        """``make()``, computed once per image."""
        if name not in self._shared:
            self._shared[name] = make()
        return self._shared[name]

    def with_pe(self, keys: torch.Tensor) -> torch.Tensor:
        """``keys + key_pe`` in a reused buffer."""
        return torch.add(keys, self.key_pe, out=self.buffer("with_pe", keys.shape, keys))


def _heads(linear: torch.nn.Linear, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A projection's weight as (heads, head_dim, in) and bias as (heads, head_dim)."""
    out_features, in_features = linear.weight.shape
    head_dim = out_features // num_heads
    return (
        linear.weight.view(num_heads, head_dim, in_features),
        linear.bias.view(num_heads, head_dim),
    )


def _heads_of(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, tokens, heads * d) as (batch, heads, tokens, d)."""
    batch, tokens, width = x.shape
    return x.view(batch, tokens, heads, width // heads).transpose(1, 2)


def _split(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``_heads_of(x)`` scaled by 1 / sqrt(d), the attention's scale."""
    return _heads_of(x, heads) / math.sqrt(x.shape[-1] // heads)


def _tokens_to_shared_image(module, q_tokens, side: ImageSide) -> torch.Tensor:
    """Tokens attend to the image keys every point shares: their projections are the
    image's, the attention runs for the whole batch at once, head by head."""
    heads, keys = module.num_heads, side.initial
    k_t = side.shared(
        "t2i_k", lambda: _heads_of(module.k_proj(keys + side.key_pe), heads)[0].mT.contiguous()
    )  # (heads, d, h * w)
    v = side.shared("t2i_v", lambda: _heads_of(module.v_proj(keys), heads)[0].contiguous())
    q = _split(module.q_proj(q_tokens), heads)  # (batch, heads, tokens, d)
    batch, _, n_tokens, head_dim = q.shape
    q = q.transpose(0, 1).reshape(heads, batch * n_tokens, head_dim)
    attn = torch.softmax(torch.bmm(q, k_t), dim=-1)
    mixed = torch.bmm(attn, v).view(heads, batch, n_tokens, head_dim).permute(1, 2, 0, 3)
    return module.out_proj(mixed.reshape(batch, n_tokens, -1))


def _tokens_to_image(module, q_tokens, chunks, side: ImageSide) -> torch.Tensor:
    """Tokens attend to each point's own image keys, projections folded into the tokens."""
    heads = module.num_heads
    w_k, _ = _heads(module.k_proj, heads)
    w_v, b_v = _heads(module.v_proj, heads)
    q = _split(module.q_proj(q_tokens), heads)
    batch, _, n_tokens, _ = q.shape
    q_k = torch.einsum("bhtd,hdc->bhtc", q, w_k).flatten(1, 2)  # (batch, heads * tokens, C)
    q_k = q_k.to(chunks[0].dtype)
    mixed, start = [], 0
    for keys in chunks:
        stop = start + keys.shape[0]
        scores = torch.bmm(
            q_k[start:stop],
            side.with_pe(keys).transpose(1, 2),
            out=side.buffer("scores", (stop - start, q_k.shape[1], keys.shape[1]), keys),
        )
        attn = torch.softmax(scores, dim=-1)
        mixed.append(torch.bmm(attn, keys))
        start = stop
    mixed = torch.cat(mixed).view(batch, heads, n_tokens, -1)
    out = torch.einsum("bhtc,hdc->bthd", mixed, w_v) + b_v
    return module.out_proj(out.flatten(2))


def _image_to_tokens(module, norm, chunks, side, k_tokens, v_tokens, *, shared: bool):
    """The image attends to the tokens, chunk by chunk: ``norm(keys + attention)``, with
    the output projection folded into the token values. ``shared``: every point sees the
    same image keys, whose query projection is computed once; otherwise the query
    projection is folded into the token keys.
    """
    heads, dtype = module.num_heads, chunks[0].dtype
    k = _split(module.k_proj(k_tokens), heads).to(dtype)  # (batch, heads, tokens, d)
    v = module.v_proj(v_tokens)
    batch, _, n_tokens, head_dim = k.shape
    w_out = module.out_proj.weight
    values = torch.einsum(
        "bthd,chd->bhtc", v.view(batch, n_tokens, heads, -1), w_out.view(len(w_out), heads, -1)
    )  # (batch, heads, tokens, C)
    # each head's attention over the tokens sums to one: the output bias rides on the values
    values = (values + module.out_proj.bias / heads).flatten(1, 2).to(dtype)
    if shared:
        q = side.shared(
            "i2t_q",
            lambda: (
                module.q_proj(side.initial + side.key_pe)[0]
                .view(-1, heads, head_dim)
                .permute(1, 2, 0)
                .contiguous()
            ),
        )  # (heads, d, h * w)
    else:
        w_q, b_q = _heads(module.q_proj, heads)
        k_q = torch.einsum("bhtd,hdc->bhtc", k, w_q).flatten(1, 2).to(dtype)
        bias = torch.einsum("bhtd,hd->bht", k, b_q).flatten(1)[:, :, None].to(dtype)
    store = side.buffer(
        f"keys_{'first' if shared else 'later'}",
        (batch, *chunks[0].shape[1:]),
        chunks[0],
    )
    updated, start = [], 0
    for keys in chunks:
        stop, n = start + keys.shape[0], keys.shape[0]
        shape = (n, heads * n_tokens, keys.shape[1])
        logits = side.buffer("logits", shape, keys)
        if shared:
            _against_shared_queries(k[start:stop], q, logits)
        else:
            torch.baddbmm(
                bias[start:stop], k_q[start:stop], side.with_pe(keys).transpose(1, 2), out=logits
            )
        attn = torch.softmax(logits.view(n, heads, n_tokens, -1), dim=2).view(shape).to(dtype)
        out = torch.bmm(
            attn.transpose(1, 2),
            values[start:stop],
            out=side.buffer("attended", (n, *keys.shape[1:]), keys),
        )
        out.add_(keys)
        updated.append(_layer_norm(norm, out, store[start:stop], side))
        start = stop
    return updated


def _against_shared_queries(k: torch.Tensor, q: torch.Tensor, logits: torch.Tensor) -> None:
    """The token keys ``k`` (points, heads, tokens, d) against the image's queries ``q``
    (heads, d, h * w), into ``logits`` (points, heads * tokens, h * w): one product per head
    over the tokens of every point of the pass."""
    n, heads, n_tokens, head_dim = k.shape
    rows = k.transpose(0, 1).reshape(heads, n * n_tokens, head_dim)
    if n == 1:  # the buffer's layout already
        torch.bmm(rows, q, out=logits.view(heads, n_tokens, -1))
    else:
        by_head = torch.bmm(rows, q).view(heads, n, n_tokens, -1)
        logits.view(n, heads, n_tokens, -1).copy_(by_head.transpose(0, 1))


def _layer_norm(norm: torch.nn.LayerNorm, x: torch.Tensor, out: torch.Tensor, side):
    """``norm(x)`` written into ``out``."""
    stats = side.buffer("ln_stats", (*x.shape[:-1], 1), x)
    stats2 = side.buffer("ln_stats2", (*x.shape[:-1], 1), x)
    weight, bias = norm.weight.to(x.dtype), norm.bias.to(x.dtype)
    torch.ops.aten.native_layer_norm.out(
        x, list(norm.normalized_shape), weight, bias, norm.eps,
        out0=out, out1=stats, out2=stats2,
    )  # fmt: skip
    return out


def two_way_block(block, queries, chunks, query_pe, side, *, index: int):
    """The ``index``-th ``TwoWayAttentionBlock``. In the first one all points see the
    same image keys.
    """
    if block.skip_first_layer_pe:
        queries = block.self_attn(q=queries, k=queries, v=queries)
    else:
        q = queries + query_pe
        queries = queries + block.self_attn(q=q, k=q, v=queries)
    queries = block.norm1(queries)
    q_tokens = queries + query_pe
    if index == 0:
        attn = _tokens_to_shared_image(block.cross_attn_token_to_image, q_tokens, side)
    else:
        attn = _tokens_to_image(block.cross_attn_token_to_image, q_tokens, chunks, side)
    queries = block.norm2(queries + attn)
    queries = block.norm3(queries + block.mlp(queries))
    chunks = _image_to_tokens(
        block.cross_attn_image_to_token,
        block.norm4,
        chunks,
        side,
        queries + query_pe,
        queries,
        shared=index == 0,
    )
    return queries, chunks


def two_way_transformer(
    transformer,
    tokens: torch.Tensor,
    features: torch.Tensor,
    dense: torch.Tensor,
    sides: ImageSides,
    *,
    chunk: int,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The decoder's ``TwoWayTransformer`` (SAM 1's or SAM 2's) on a batch of point
    tokens, the image embedding ``features`` (1, C, H, W) and the dense prompt embeddings
    (the same for every point), in the dtype autocast runs in, else the embedding's.
    Returns the token outputs and the final image keys (points, H * W, C), ``chunk``
    points per tensor.
    """
    if len(transformer.layers) < 2:
        raise ValueError("the two-way transformer needs at least two layers")
    dtype = compute_dtype(features.device, features.dtype)
    side = sides.get(features.device, dtype)
    tokens = tokens.to(dtype)
    sizes = [min(chunk, len(tokens) - i) for i in range(0, len(tokens), chunk)]
    side.set_image(features, dense)
    chunks = [side.initial.expand(n, -1, -1) for n in sizes]
    queries = tokens
    for i, layer in enumerate(transformer.layers):
        queries, chunks = two_way_block(layer, queries, chunks, tokens, side, index=i)
    attn = _tokens_to_image(transformer.final_attn_token_to_image, queries + tokens, chunks, side)
    return transformer.norm_final_attn(queries + attn), chunks
