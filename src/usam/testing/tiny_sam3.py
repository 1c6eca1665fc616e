"""A tiny random SAM 3 built in code, for ``baseline.sam3.model=tiny``: the SAM 3 baseline's
whole path (text prompts, detection, post-processing, metrics) in seconds, no download."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

START, END, UNKNOWN = "<|startoftext|>", "<|endoftext|>", "<|unknown|>"
IMAGE_SIZE, PATCH_SIZE, WIDTH = 56, 14, 32


def tiny_sam3(classes: Sequence[str], seed: int = 0) -> tuple[torch.nn.Module, Any]:
    """A random ``Sam3Model`` (eval mode) a few hundred thousand parameters big, the same
    for a given ``seed``, and its ``Sam3Processor`` with a word-level tokenizer over the
    class names' words."""
    from transformers import Sam3ImageProcessor, Sam3Model, Sam3Processor

    tokenizer = _word_tokenizer(classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # random weights are the same every run, as for the tiny SAM
        model = Sam3Model(_config(tokenizer.get_vocab()))
    grid = IMAGE_SIZE // PATCH_SIZE
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    mask_size = {"height": 4 * grid, "width": 4 * grid}
    processor = Sam3Processor(Sam3ImageProcessor(size=size, mask_size=mask_size), tokenizer)
    return model.eval(), processor


def _word_tokenizer(classes: Sequence[str]) -> Any:
    """One token per lower-cased word of the class names, framed as CLIP frames a prompt."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({word for name in classes for word in name.lower().split()})
    vocab = {token: i for i, token in enumerate([END, START, UNKNOWN, *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNKNOWN))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{START} $A {END}", special_tokens=[(START, vocab[START]), (END, vocab[END])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=START, eos_token=END, pad_token=END, unk_token=UNKNOWN
    )


def _config(vocab: dict[str, int]) -> Any:
    """SAM 3's layout at width 32: a 2-block ViT on 56-pixel images, one layer elsewhere."""
    from transformers import Sam3Config

    grid = IMAGE_SIZE // PATCH_SIZE
    small = {"hidden_size": WIDTH, "num_attention_heads": 2, "intermediate_size": 2 * WIDTH}
    return Sam3Config(
        vision_config={
            "backbone_config": {
                "model_type": "sam3_vit_model",
                **small,
                "num_hidden_layers": 2,
                "image_size": IMAGE_SIZE,
                "pretrain_image_size": IMAGE_SIZE,
                "patch_size": PATCH_SIZE,
                "window_size": grid // 2,
                "global_attn_indexes": [1],
            },
            "fpn_hidden_size": WIDTH,
            "backbone_feature_sizes": [[4 * grid] * 2, [2 * grid] * 2, [grid] * 2],
        },
        text_config={
            "model_type": "clip_text_model",
            **small,
            "vocab_size": len(vocab),
            "projection_dim": WIDTH,
            "num_hidden_layers": 1,
            "max_position_embeddings": 32,
            "bos_token_id": vocab[START],
            "eos_token_id": vocab[END],
            "pad_token_id": vocab[END],
        },
        geometry_encoder_config={**small, "num_layers": 1},
        detr_encoder_config={**small, "num_layers": 1},
        detr_decoder_config={**small, "num_layers": 1, "num_queries": 8},
        mask_decoder_config={"hidden_size": WIDTH, "num_attention_heads": 2},
    )
