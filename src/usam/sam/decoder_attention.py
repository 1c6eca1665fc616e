"""The mask decoder's two-way transformer (SAM 1's and SAM 2's, which share its layout),
with its image-side work done per point chunk.

The image side (4096 x 256 values per point for the 1024-pixel models) is memory-bound,
so it runs a few points at a time to stay in cache, while the token-side layers see
the whole point batch, as in the official decoder. Until the first image-to-token
attention every point sees the same image keys, so their projections are computed once
per image. ``folded=True`` is approximate mode's reordering of the attention products.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d


class ImageSide:
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
        # Whether the official decoder sees more than one point in the batch at hand:
        # then a point alone in its chunk takes the batch's product kernels.
        self.batch_of_many = True

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


def _attention_core(module, q, k, v, side: ImageSide, *, buffered: bool) -> torch.Tensor:
    """The official ``Attention.forward`` between the input projections and ``out_proj``;
    ``buffered``: its large products go into the image's reused buffers.

    For two or more points ``matmul`` copies the per-head views into contiguous batches
    of matrices; for a point alone they fold into strided matrices, which takes other
    kernels, with other rounding on some CPUs (AMD EPYC with MKL). Unless the official
    batch is one point, a lone point's views are copied as a batch's would be.
    SAM 2's attention (which has ``dropout_p``) is PyTorch's fused
    ``scaled_dot_product_attention``, as in its own ``Attention.forward``.
    """
    if hasattr(module, "dropout_p"):
        heads = module.num_heads
        q, k, v = (module._separate_heads(x, heads) for x in (q, k, v))
        if q.shape[0] == 1 and side.batch_of_many:
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        return module._recombine_heads(F.scaled_dot_product_attention(q, k, v))
    q = module._separate_heads(q, module.num_heads)
    k_t = module._separate_heads(k, module.num_heads).permute(0, 1, 3, 2)
    v = module._separate_heads(v, module.num_heads)
    if q.shape[0] == 1 and side.batch_of_many:
        q, k_t, v = q.contiguous(), k_t.contiguous(), v.contiguous()
    attn = q @ k_t
    attn = attn / math.sqrt(q.shape[-1])
    attn = torch.softmax(attn, dim=-1)
    return side.attend(attn, v) if buffered else module._recombine_heads(attn @ v)


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


def _tokens_to_image(module, q_tokens, chunks, side: ImageSide, *, shared: bool):
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
        outs.append(_attention_core(module, q[start:stop], k(keys), v(keys), side, buffered=False))
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
        attended = _attention_core(
            module, q(keys), k[start:stop], v[start:stop], side, buffered=True
        )
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


def _tokens_to_image_folded(module, q_tokens, chunks, side: ImageSide) -> torch.Tensor:
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


def two_way_block(block, queries, chunks, query_pe, side, *, folded: bool, index: int):
    """The ``index``-th ``TwoWayAttentionBlock``; ``folded`` for approximate mode. In the
    first one all points see the same image keys.
    """
    if block.skip_first_layer_pe:
        queries = block.self_attn(q=queries, k=queries, v=queries)
    else:
        q = queries + query_pe
        queries = queries + block.self_attn(q=q, k=q, v=queries)
    queries = block.norm1(queries)
    attn = to_image(
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


def two_way_transformer(
    transformer,
    tokens: torch.Tensor,
    features: torch.Tensor,
    dense: torch.Tensor,
    side: ImageSide,
    *,
    chunk: int,
    folded: bool,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The decoder's ``TwoWayTransformer`` (SAM 1's or SAM 2's) on a batch of point
    tokens, the image embedding ``features`` (1, C, H, W) and the dense prompt embeddings
    (the same for every point). Returns the token outputs and the final image keys,
    ``chunk`` points per tensor.
    """
    side.batch_of_many = tokens.shape[0] > 1
    sizes = [min(chunk, len(tokens) - i) for i in range(0, len(tokens), chunk)]
    initial = {n: (features + dense[:n]).flatten(2).permute(0, 2, 1) for n in set(sizes)}
    chunks = [initial[n] for n in sizes]
    queries = tokens
    for i, layer in enumerate(transformer.layers):
        queries, chunks = two_way_block(
            layer, queries, chunks, tokens, side, folded=folded, index=i
        )
    attn = to_image(
        transformer.final_attn_token_to_image,
        queries + tokens,
        chunks,
        side,
        folded=folded,
        shared=False,
    )
    return transformer.norm_final_attn(queries + attn), chunks


def to_image(module, q_tokens, chunks, side, *, folded: bool, shared: bool) -> torch.Tensor:
    """Token-to-image attention; with shared keys the exact form, which projects them once
    per image, is the cheaper one in approximate mode too.
    """
    if folded and not shared:
        return _tokens_to_image_folded(module, q_tokens, chunks, side)
    return _tokens_to_image(module, q_tokens, chunks, side, shared=shared)


def upscale(
    upscaling: torch.nn.Sequential,
    src: torch.Tensor,
    folded: bool,
    high_res: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The decoder's ``output_upscaling``; ``high_res``: SAM 2's (s0, s1) features, added
    after each transposed convolution as its ``predict_masks`` does. Its LayerNorm2d runs
    over the first convolution's output in place: in exact mode as the official operations
    in their order, without their five temporaries; in approximate mode as one
    ``layer_norm`` over channels-last memory, about 3x faster on CPU than the five passes.
    """
    # SAM 1's and SAM 2's LayerNorm2d are separate classes with the same computation
    if len(upscaling) != 5 or type(upscaling[1]).__name__ != LayerNorm2d.__name__:
        return upscaling(src)
    conv1, norm, act1, conv2, act2 = upscaling
    x = conv1(src)
    if high_res is not None:
        x = x.add_(high_res[1])
    if folded:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps).permute(0, 3, 1, 2)
    else:
        x = x.sub_(x.mean(1, keepdim=True))  # x - u, which the official code computes twice
        x = x.div_(torch.sqrt(x.pow(2).mean(1, keepdim=True) + norm.eps))
        x = x.mul_(norm.weight[:, None, None]).add_(norm.bias[:, None, None])
    x = conv2(act1(x))
    if high_res is not None:
        x = x.add_(high_res[0])
    return act2(x)
