"""A tiny random-weight Stable Diffusion pipeline, built in code with no download.

It runs the real generation path (tokenizer, text encoder, UNet, VAE, scheduler)
in well under a second per batch on a CPU, so tests and the offline demo can
exercise everything but the pictures. Its images are noise: a marker file in
the saved directory makes every image set generated from it say so.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

RANDOM_WEIGHTS_MARKER = "usam_random_weights.json"


def _tokenizer():
    """A byte-level CLIP tokenizer with no merges: every character is its own token."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {char: i for i, char in enumerate(alphabet)}
    vocab.update({char + "</w>": len(alphabet) + i for i, char in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _text_encoder(tokenizer):
    """A 2-layer, 32-wide CLIP text encoder over ``tokenizer``'s vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer.get_vocab()),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=77,
        )
    )


def build_tiny_pipeline(seed: int = 0):
    """A StableDiffusionPipeline with 32-wide UNet/VAE and a 2-layer CLIP text encoder.

    Its weights come from ``seed`` inside a forked RNG, so that building it leaves the
    global RNG, and with it the training that follows, as it was."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    tokenizer = _tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            block_out_channels=(32, 64),
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            sample_size=32,
        )
        text_encoder = _text_encoder(tokenizer)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_pipeline(directory: str | Path, seed: int = 0) -> Path:
    """Build the tiny pipeline and save it where ``generate.model`` can point.

    It is saved next to ``directory`` and renamed into place, so an interrupted
    build never leaves a half-written pipeline that later loads.
    """
    directory = Path(directory)
    if directory.exists():
        raise FileExistsError(f"{directory} already exists; delete it to build a new pipeline")
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    build_tiny_pipeline(seed).save_pretrained(partial)
    (partial / RANDOM_WEIGHTS_MARKER).write_text(
        json.dumps({"random_weights": True, "seed": seed, "made_by": "usam.testing.tiny_diffusion"})
    )
    os.replace(partial, directory)
    return directory


def is_random_weight_pipeline(model: str | Path) -> bool:
    return (Path(model) / RANDOM_WEIGHTS_MARKER).is_file()
