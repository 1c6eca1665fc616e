"""Generate training images: ``python -m usam.generate data.classes=voc20 generate.per_class=200``.

Stable Diffusion (:mod:`usam.images.stable_diffusion`) renders "a photo of a
{class}" per class into the image set ``<vocabulary>_<generate.name>`` (``voc20_sd``;
``generate=tiny``: ``voc20_sd_tiny``) that ``usam.extract`` and ``usam.fit`` read with
``data.source=<generate.name>`` (:mod:`usam.images.image_sets`).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from usam.core.stopping import stoppable
from usam.core.vocabulary import load_vocabulary
from usam.formats.image_shards import images_on_disk
from usam.images.image_sets import image_set_dir
from usam.images.stable_diffusion import GenerateSettings, generate_images


def run(cfg: DictConfig) -> Path:
    """Generate from a composed config (``generate.yaml``); returns the image set directory."""
    vocab = load_vocabulary(cfg.data.classes)
    settings = GenerateSettings.from_config(OmegaConf.to_container(cfg.generate, resolve=True))
    out_dir = Path(settings.out_dir or image_set_dir(cfg.images_dir, vocab, settings.name))
    with stoppable("generate", lambda: f"{images_on_disk(out_dir)} images in {out_dir}"):
        if cfg.get("wandb_project"):
            import wandb

            with wandb.init(
                project=cfg.wandb_project,
                job_type="generate",
                dir=str(cfg.paths.output_dir),
                config={"classes": list(vocab.classes), "generate": asdict(settings)},
            ):
                generate_images(vocab, settings, out_dir)
        else:
            generate_images(vocab, settings, out_dir)
    return out_dir
