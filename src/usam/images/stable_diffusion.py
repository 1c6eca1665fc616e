"""Training images from class names with Stable Diffusion (the paper's main source).

``python -m usam.generate data.classes=voc20 generate.per_class=200`` writes an
image set (:mod:`usam.formats.image_shards`) to
``${paths.data_dir}/images/<vocabulary>_<generate.name>/`` (``voc20_sd`` here;
``generate.out_dir`` overrides it; an inline class list is named
``custom-<hash of the names>``), with one contact sheet per class in its
``contact_sheets/``. ``generate=tiny`` builds a random-weight pipeline in
``${paths.cache_dir}`` and runs the same path offline in seconds.

Every image has its own seed, derived from ``generate.seed``, the class name and
the image's index within the class, so any single image can be regenerated
alone (:func:`plan_image` + :func:`render`). Runs resume: images already in the
directory are not generated again, and each image is flushed to disk as soon as
its batch finishes. For a superclass vocabulary (``voc_superclasses``) the
prompt names the superclass itself ("a photo of a animals"), the paper's one
prompt per class name; ``generate.superclass_prompts=members`` cycles through its
member classes instead ("a photo of a cat" labelled ``animals``) and records the
member in each image's metadata.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from usam.core.config import settings_from_config
from usam.core.devices import resolve_device
from usam.core.errors import UsageError
from usam.core.progress import progress_bar
from usam.core.stopping import stop_if_requested
from usam.core.vocabulary import Vocabulary, normalise_name
from usam.formats.image_shards import (
    ImageManifest,
    ImageShardWriter,
    encode_jpeg,
    slug,
)
from usam.testing.tiny_diffusion import is_random_weight_pipeline, save_tiny_pipeline
from usam.viz.contact_sheet import write_contact_sheets

log = logging.getLogger(__name__)

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"
TEMPLATE_ORDERS = ("round_robin", "random")
SUPERCLASS_PROMPTS = ("class_name", "members")
# What makes an image what it is: a resumed run must agree on all of these.
RECIPE_KEYS = (
    "prompt",
    "negative_prompt",
    "seed",
    "model",
    "steps",
    "guidance_scale",
    "height",
    "width",
)


class GenerationError(UsageError, RuntimeError):
    """Generation cannot start or continue: bad settings, missing weights, a foreign directory."""


@dataclass
class GenerateSettings:
    """The ``generate`` config group, checked before any weights are loaded."""

    model: str = DEFAULT_MODEL
    build_tiny: bool = False  # build a random-weight pipeline at `model` when it is missing
    name: str = "sd"  # suffix of the default output directory
    templates: list[str] = field(default_factory=lambda: ["a photo of a {c}"])
    template_order: str = "round_robin"
    class_templates: dict[str, list[str]] = field(default_factory=dict)
    superclass_prompts: str = "class_name"  # class_name (the paper) | members
    negative_prompt: str | None = None
    per_class: int = 200
    # images the safety checker may flag in one class, each replaced by a new one, before
    # generation stops: every class gets per_class usable images or the run says which did not
    max_flagged_per_class: int = 50
    batch_size: int = 8
    steps: int = 50
    guidance_scale: float = 7.5
    height: int = 512
    width: int = 512
    seed: int = 0
    safety_checker: bool = True
    device: str = "auto"
    fp16: bool = True  # only on CUDA; CPUs run float32
    jpeg_quality: int = 95
    images_per_shard: int = 1000
    out_dir: str | None = None
    contact_sheet_max: int = 64

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> GenerateSettings:
        return settings_from_config(cls, config, "generate", GenerationError)

    def check(self) -> None:
        problems = []
        if self.max_flagged_per_class < 0:
            problems.append(
                f"generate.max_flagged_per_class must be >= 0 (got {self.max_flagged_per_class})"
            )
        for name in ("per_class", "batch_size", "steps", "images_per_shard"):
            if int(getattr(self, name)) < 1:
                problems.append(f"generate.{name} must be at least 1 (got {getattr(self, name)})")
        for name in ("height", "width"):
            value = int(getattr(self, name))
            if value < 8 or value % 8:
                problems.append(f"generate.{name} must be a positive multiple of 8 (got {value})")
        if self.template_order not in TEMPLATE_ORDERS:
            problems.append(
                f"generate.template_order is {self.template_order!r}; use one of {TEMPLATE_ORDERS}"
            )
        if self.superclass_prompts not in SUPERCLASS_PROMPTS:
            problems.append(
                f"generate.superclass_prompts is {self.superclass_prompts!r}; "
                f"use one of {SUPERCLASS_PROMPTS}"
            )
        all_templates = [*self.templates, *(t for ts in self.class_templates.values() for t in ts)]
        if not self.templates:
            problems.append("generate.templates is empty; give one, e.g. 'a photo of a {c}'")
        for template in all_templates:
            if "{c}" not in template:
                problems.append(f"template {template!r} has no '{{c}}' for the class name")
        if problems:
            raise GenerationError("; ".join(problems))


@dataclass(frozen=True)
class ImagePlan:
    """Everything that determines one image, derived from (class, index) alone."""

    key: str
    class_index: int
    class_name: str
    member: str | None
    index: int
    template: str
    prompt: str
    seed: int


def image_seed(base_seed: int, class_name: str, index: int) -> int:
    digest = hashlib.sha256(f"{base_seed}/{class_name}/{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def class_templates(vocab: Vocabulary, settings: GenerateSettings) -> list[list[str]]:
    """Templates per class: `class_templates` overrides `templates` for the classes it names."""
    overrides = {normalise_name(k): list(v) for k, v in settings.class_templates.items()}
    unknown = sorted(set(overrides) - set(vocab.classes))
    if unknown:
        raise GenerationError(
            f"generate.class_templates names {unknown}, which are not classes of "
            f"'{vocab.name}' ({', '.join(vocab.classes)})"
        )
    return [overrides.get(name, list(settings.templates)) for name in vocab.classes]


def plan_image(
    vocab: Vocabulary, class_index: int, index: int, settings: GenerateSettings
) -> ImagePlan:
    """Members (``superclass_prompts=members``) cycle first, then templates, so every
    (member, template) pair gets its turn."""
    class_name = vocab.classes[class_index]
    templates = class_templates(vocab, settings)[class_index]
    by_members = bool(vocab.members) and settings.superclass_prompts == "members"
    members = vocab.members[class_name] if by_members else (class_name,)
    seed = image_seed(settings.seed, class_name, index)
    if settings.template_order == "round_robin":
        template = templates[(index // len(members)) % len(templates)]
    else:
        template = templates[random.Random(seed).randrange(len(templates))]
    member = members[index % len(members)]
    return ImagePlan(
        key=f"c{class_index:03d}-{slug(class_name)}-{index:06d}",
        class_index=class_index,
        class_name=class_name,
        member=member if by_members else None,
        index=index,
        template=template,
        prompt=template.replace("{c}", member),
        seed=seed,
    )


def _is_local(model: str) -> bool:
    return Path(model).expanduser().exists() or model.startswith(("/", ".", "~"))


def load_pipeline(settings: GenerateSettings):
    """The diffusers pipeline on its device; fails with what to do when weights are missing."""
    import torch
    import transformers
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    # generation draws its own bar per class; the libraries' loading bars would interleave
    diffusers_logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()

    device = resolve_device(settings.device, "generate.device")
    dtype = torch.float16 if device.type == "cuda" and settings.fp16 else torch.float32
    model = settings.model
    if _is_local(model) and not (Path(model).expanduser() / "model_index.json").is_file():
        raise GenerationError(
            f"generate.model={model} is not a diffusers pipeline directory (no model_index.json "
            "there); point it at a directory saved with save_pretrained, or use generate=tiny"
        )
    options: dict[str, Any] = {"dtype": dtype}
    if not settings.safety_checker:
        options.update(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(str(Path(model).expanduser()), **options)
    except (OSError, ValueError) as error:
        raise GenerationError(
            f"could not load the Stable Diffusion pipeline '{model}' ({error}). If this machine "
            "is offline or has no copy of the weights, download them where there is network "
            f"access (`hf download {model} --local-dir sd-weights`), copy that directory here "
            "and run with generate.model=/path/to/dir; to try the pipeline without weights "
            "use generate=tiny"
        ) from error
    if settings.safety_checker and getattr(pipe, "safety_checker", None) is None:
        log.warning("pipeline %s has no safety checker; images are not screened", model)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def render(pipe, plans: Sequence[ImagePlan], settings: GenerateSettings):
    """One batch: (PIL images, nsfw flags). CPU generators make seeds device-independent."""
    import torch

    negative = settings.negative_prompt
    output = pipe(
        prompt=[p.prompt for p in plans],
        negative_prompt=[negative] * len(plans) if negative else None,
        height=settings.height,
        width=settings.width,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance_scale,
        generator=[torch.Generator("cpu").manual_seed(p.seed) for p in plans],
        output_type="pil",
    )
    flags = output.nsfw_content_detected or [False] * len(plans)
    return output.images, [bool(f) for f in flags]


def image_metadata(plan: ImagePlan, settings: GenerateSettings, random_weights: bool) -> dict:
    return {
        "class_name": plan.class_name,
        "class_index": plan.class_index,
        "source": "sd",
        "member": plan.member,
        "index": plan.index,
        "template": plan.template,
        "prompt": plan.prompt,
        "negative_prompt": settings.negative_prompt,
        "seed": plan.seed,
        "model": settings.model,
        "steps": settings.steps,
        "guidance_scale": settings.guidance_scale,
        "height": settings.height,
        "width": settings.width,
        "random_weights": random_weights,
    }


def _check_recipes(
    writer: ImageShardWriter,
    plans: list[ImagePlan],
    settings: GenerateSettings,
    random_weights: bool,
) -> None:
    for plan in plans:
        done = writer.done.get(plan.key)
        if done is None:
            continue
        wanted = image_metadata(plan, settings, random_weights)
        for name in RECIPE_KEYS:
            if done.get(name) != wanted[name]:
                raise GenerationError(
                    f"{writer.directory} already holds image {plan.key} made with {name}="
                    f"{done.get(name)!r}, but this run asks for {wanted[name]!r}; write to "
                    "another directory (generate.out_dir=...) or delete that one"
                )


def _class_state(writer: ImageShardWriter, class_index: int) -> tuple[int, int, int]:
    """(usable, flagged, next index) of one class among the images already written."""
    metas = [m for m in writer.done.values() if m.get("class_index") == class_index]
    flagged = sum(1 for m in metas if m.get("flagged"))
    next_index = max((m["index"] for m in metas), default=-1) + 1
    return len(metas) - flagged, flagged, next_index


def generate_images(
    vocab: Vocabulary, settings: GenerateSettings, out_dir: str | Path, *, progress: bool = True
) -> ImageManifest:
    """Fill ``out_dir`` with ``per_class`` usable images per class; returns the manifest.

    Plans 0 .. per_class-1 come first; an image the safety checker flags stays in the set,
    marked, and the next plan index replaces it, up to ``max_flagged_per_class`` per class.
    """
    settings.check()
    model_dir = Path(settings.model).expanduser()
    if settings.build_tiny and not (model_dir / "model_index.json").is_file():
        log.info("building a tiny random-weight pipeline at %s", model_dir)
        save_tiny_pipeline(model_dir)
    random_weights = is_random_weight_pipeline(model_dir)
    config = {k: v for k, v in asdict(settings).items() if k != "out_dir"}
    with ImageShardWriter(
        out_dir,
        vocabulary=vocab.name,
        classes=vocab.classes,
        source="sd",
        config=config,
        random_weights=random_weights,
        images_per_shard=settings.images_per_shard,
    ) as writer:
        done_before = len(writer.done)
        classes = range(vocab.num_classes)
        for c in classes:
            planned = [plan_image(vocab, c, i, settings) for i in range(_class_state(writer, c)[2])]
            _check_recipes(writer, planned, settings, random_weights)
        missing = [settings.per_class - _class_state(writer, c)[0] for c in classes]
        if any(m > 0 for m in missing):
            pipe = load_pipeline(settings)
            with progress_bar(enabled=progress) as bar:
                for c, name in enumerate(vocab.classes):
                    task = bar.add_task(
                        name, total=settings.per_class, completed=settings.per_class - missing[c]
                    )
                    _fill_class(writer, pipe, vocab, c, settings, random_weights, (bar, task))
    new = len(writer.done) - done_before
    write_contact_sheets(out_dir, max_per_class=settings.contact_sheet_max)
    manifest = writer.manifest
    log.info(
        "%d images in %s (%d new)%s",
        manifest.num_images,
        out_dir,
        new,
        ", random weights" if random_weights else "",
    )
    if manifest.flagged:
        log.warning(
            "%d images were blacked out by the safety checker: skipped, and replaced",
            manifest.flagged,
        )
    return manifest


def _fill_class(writer, pipe, vocab, class_index, settings, random_weights, progress) -> None:
    """Render the next plans of one class until it has ``per_class`` usable images."""
    bar, task = progress
    while True:
        usable, flagged, next_index = _class_state(writer, class_index)
        if usable >= settings.per_class:
            return
        if flagged > settings.max_flagged_per_class:
            raise GenerationError(
                f"the safety checker flagged {flagged} images of class "
                f"{vocab.classes[class_index]!r} ({usable} of {settings.per_class} usable so "
                f"far, in {writer.directory}); raise generate.max_flagged_per_class, change the "
                "class's prompts (generate.class_templates) or drop the class"
            )
        count = min(settings.batch_size, settings.per_class - usable)
        batch = [plan_image(vocab, class_index, next_index + i, settings) for i in range(count)]
        images, flags = render(pipe, batch, settings)
        for plan, image, is_flagged in zip(batch, images, flags, strict=True):
            meta = image_metadata(plan, settings, random_weights)
            meta.update(nsfw=is_flagged, flagged=is_flagged)
            writer.write(plan.key, encode_jpeg(image, settings.jpeg_quality), meta)
        bar.advance(task, count - sum(flags))
        stop_if_requested()  # the batch is on disk
