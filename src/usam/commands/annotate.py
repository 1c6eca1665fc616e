"""Label a folder of images with a trained head: ``python -m usam.annotate images=DIR ckpt=HEAD.ckpt
out=DIR sam=vit_h``.

The folder goes through the extraction engine into a shard set (SAM's masks and
mask tokens; unusable files into ``rejected.jsonl``), then every image through
the :class:`usam.inference.predictor.Predictor` the evaluation uses. Each image's result
is written atomically to ``results/<key>.json`` after its pictures, so an
interrupted run loses nothing and the next one skips what is done (unless
``overwrite=true``); ``annotations.json`` (COCO instances) is rebuilt from those
results at the end, as is every other export (``export=``), so none holds an image
twice. The work shard set under ``sam/`` is deleted once its images are annotated.

Output folder: ``semantic/<path>.png`` (VOC palette, pixel value = label),
``legend.png``, ``overlays/<path>.jpg``, ``results/``, ``rejected.jsonl``,
``review.csv`` (images least certain first), and the exports asked for:
``annotations.json`` (COCO), ``labels/<path>.txt`` (YOLO-seg), ``label_studio/``,
``cvat/``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from usam.commands.mask_settings import configured_annotator
from usam.core.config import settings_from_config
from usam.core.progress import progress_bar
from usam.core.provenance import Provenance, report, untrained
from usam.core.stopping import stop_if_requested, stoppable
from usam.data.eval_shards import require_masks
from usam.data.extraction import ExtractSettings, is_complete, run_extraction, shard_set_dir
from usam.data.rejections import REJECTED_NAME, rejected_keys
from usam.data.sources import FolderSource, load_rgb
from usam.formats.embedding_shards import existing_keys, iter_records
from usam.formats.storage import atomic_write_text
from usam.inference.annotator import AnnotationError, Annotator
from usam.inference.exports import (
    LabelledImage,
    check_exports,
    coco_instances,
    read_result,
    save_legend,
    save_overlay,
    save_semantic,
    save_yolo,
    write_result,
)
from usam.inference.predictor import Prediction
from usam.inference.review import REVIEW_NAME, review_order, write_review_list
from usam.sam.registry import get_spec

NOT_LABELS = "these annotations only exercise the pipeline; they are NOT labels"


def _output_names(source: FolderSource) -> dict[str, str]:
    """Key -> relative path without its suffix, which names the image's output files."""
    names: dict[str, str] = {}
    seen: dict[str, Path] = {}
    for key, path in zip(source.keys, source.paths):
        stem = path.relative_to(source.root).with_suffix("").as_posix()
        if stem in seen:
            raise AnnotationError(
                f"{seen[stem]} and {path} would share the output files {stem}.*; rename one"
            )
        seen[stem] = path
        names[key] = stem
    return names


def _rejected(path: Path) -> dict[str, dict[str, Any]]:
    found = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
                found[entry["key"]] = entry
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut off by a crash: the image is simply tried again
    return found


class _Outputs:
    """Where one run writes, and what earlier runs already wrote there."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.results = out / "results"
        self.rejected = out / REJECTED_NAME

    def done(self) -> set[str]:
        return {p.stem for p in self.results.glob("*.json")} if self.results.is_dir() else set()

    def write(self, prediction: Prediction, image: np.ndarray, name: str, file_name: str, classes):
        semantic = prediction.semantic_map()
        save_semantic(semantic, self.out / "semantic" / f"{name}.png", len(classes))
        save_overlay(image, semantic, classes, self.out / "overlays" / f"{name}.jpg")
        labelled = LabelledImage(file_name, prediction)
        write_result(labelled, classes, self.results / f"{prediction.key}.json")

    def add_rejected(self, entries: dict[str, dict[str, Any]], retried: set[str]) -> None:
        """This run's rejects replace the earlier verdicts on the images it tried again."""
        earlier = {k: e for k, e in _rejected(self.rejected).items() if k not in retried}
        merged = {**earlier, **entries}
        atomic_write_text(self.rejected, "".join(json.dumps(e) + "\n" for e in merged.values()))


def _extract_and_annotate(
    annotator: Annotator,
    source: FolderSource,
    names: dict[str, str],
    outputs: _Outputs,
    pending: set[str],
    extract: ExtractSettings,
    progress: bool,
) -> int:
    """SAM over the pending images, then the head over their masks; returns images written.

    The work shard set is named by the whole image set and the SAM settings, not by what
    is pending, and holds one image per shard: an interrupted run, in either stage, leaves
    every finished image's masks for the next run, which extracts only the rest.
    """
    sam = annotator.sam
    work = shard_set_dir(outputs.out / "sam", "work", source, sam, annotator.amg, 0.0)
    for stale in work.parent.glob("*"):  # another image set or other settings
        if stale != work:
            shutil.rmtree(stale)
    held = existing_keys(work / "eval") | rejected_keys(work) if work.is_dir() else set()
    if is_complete(work, ("eval",)) and not pending <= held:  # overwrite=true after a stop
        shutil.rmtree(work)
    per_image = dataclasses.replace(extract, images_per_shard=1)
    pending_only = source.subset(lambda key, _: key in pending)
    manifests = run_extraction(pending_only, work, sam, annotator.amg, per_image)
    require_masks(manifests["eval"], work / "eval", annotator.amg)
    rejected = _rejected(work / REJECTED_NAME)
    outputs.add_rejected(rejected, pending)
    index = {key: i for i, key in enumerate(source.keys)}
    written = 0
    with progress_bar(enabled=progress) as bar:
        task = bar.add_task("annotating", total=len(pending - set(rejected)))
        for record in iter_records(work / "eval"):
            if record.key not in pending:  # annotated before an interruption
                continue
            prediction = annotator.annotate_record(record)
            image = np.asarray(load_rgb(source.paths[index[record.key]]))  # the file's pixels
            if image.shape[:2] != (prediction.height, prediction.width):  # seen at max_side
                prediction = prediction.resized(*image.shape[:2])
            file_name = record.source["path"]
            outputs.write(prediction, image, names[record.key], file_name, annotator.classes)
            written += 1
            bar.advance(task)
            stop_if_requested()
    shutil.rmtree(work.parent)
    return written


def _progress_note(outputs: _Outputs, keys: tuple[str, ...]) -> str:
    """What a stopped run leaves: the images annotated, and SAM's masks of others."""
    done = outputs.done() & set(keys)
    extracted = set().union(*map(existing_keys, (outputs.out / "sam").glob("*/eval")))
    return (
        f"{len(done)} of {len(keys)} images annotated in {outputs.out}, "
        f"SAM's masks of {len(extracted - done)} more kept"
    )


def run(cfg: DictConfig) -> dict[str, Any]:
    """Annotate ``cfg.images`` into ``cfg.out``; returns the summary it prints."""
    exports = check_exports(cfg.export)
    extract = settings_from_config(ExtractSettings, cfg.extract, "extract")
    annotator = configured_annotator(cfg)
    source = FolderSource(cfg.images, annotator.classes, cfg.max_side)
    names = _output_names(source)
    label_studio = _label_studio(cfg, exports, source.root)
    outputs = _Outputs(Path(cfg.out))
    outputs.out.mkdir(parents=True, exist_ok=True)
    done = outputs.done()
    skip = set() if cfg.overwrite else done | set(_rejected(outputs.rejected))
    pending = {key for key in source.keys if key not in skip}
    written = 0
    if pending:
        with stoppable("annotate", lambda: _progress_note(outputs, source.keys)):
            written = _extract_and_annotate(
                annotator, source, names, outputs, pending, extract, cfg.progress
            )
    finished = outputs.done()
    images = [read_result(outputs.results / f"{k}.json") for k in source.keys if k in finished]
    data = provenance_of(annotator)
    ordered = _write_exports(outputs.out, exports, images, names, annotator, label_studio)
    rejected = [k for k in _rejected(outputs.rejected) if k in set(source.keys)]
    counts = Counter(
        annotator.classes[label] for image in images for label in image.prediction.labels
    )
    summary = {
        "images": len(images),
        "annotated_now": written,
        "skipped_done": 0 if cfg.overwrite else len(done & set(source.keys)),
        "rejected": len(rejected),
        "instances": sum(counts.values()),
        "instances_per_class": {name: counts[name] for name in annotator.classes if counts[name]},
        "review_first": [(i.file_name, i.prediction.uncertainty()) for i in ordered[:10]],
        "out": str(outputs.out),
        **data.fields(),
    }
    report(data, NOT_LABELS)
    _print_summary(summary, outputs, data)
    return summary


def _label_studio(cfg: DictConfig, exports: tuple[str, ...], images_root: Path):
    """The Label Studio settings and image addresses, checked before any work (its encoder
    is an optional package, imported only when asked for)."""
    if "label_studio" not in exports:
        return None
    from usam.inference.label_studio import ImageAddresses, LabelStudioSettings

    settings = settings_from_config(LabelStudioSettings, cfg.label_studio, "label_studio")
    return settings, ImageAddresses(settings, images_root)


def _write_exports(
    out: Path,
    exports: tuple[str, ...],
    images: list[LabelledImage],
    names: dict[str, str],
    annotator: Annotator,
    label_studio: tuple[Any, Any] | None,
) -> list[LabelledImage]:
    """Every export asked for, from the finished images; returns them in review order."""
    classes, data = annotator.classes, provenance_of(annotator)
    ordered = review_order(images)
    write_review_list(ordered, out / REVIEW_NAME)
    save_legend(classes, out / "legend.png")
    if "coco" in exports:
        coco = coco_instances(images, classes)
        coco["info"].update(data.fields())
        atomic_write_text(out / "annotations.json", json.dumps(coco))
    if "yolo" in exports:
        for image in images:
            save_yolo(image.prediction, out / "labels" / f"{names[image.prediction.key]}.txt")
    if label_studio is not None:
        from usam.inference.label_studio import model_version, write_label_studio

        settings, addresses = label_studio
        head = annotator.predictor.checkpoint.path
        name = head.name if head else "head"
        version = model_version(name, annotator.sam_model_type, data.random_weights)
        write_label_studio(
            out / "label_studio", ordered, classes, addresses, version, settings.polygons
        )
    if "cvat" in exports:
        from usam.inference.cvat import write_cvat

        write_cvat(out / "cvat", ordered, classes)
    return ordered


def provenance_of(annotator: Annotator) -> Provenance:
    """Why these annotations are no labels at all: a head or a SAM that was never trained."""
    data = annotator.predictor.checkpoint.provenance
    if get_spec(annotator.sam_model_type).random_weights and not annotator.sam_checkpoint:
        data += Provenance((untrained(f"SAM ({annotator.sam_model_type})"),))
    return data


def _print_summary(summary: dict[str, Any], outputs: _Outputs, data: Provenance) -> None:
    print(
        f"{summary['images']} images annotated in {summary['out']} ({summary['annotated_now']} "
        f"now, {summary['skipped_done']} already done), {summary['instances']} instances"
        + data.note()
    )
    if summary["rejected"]:
        print(f"{summary['rejected']} files are not usable images: see {outputs.rejected}")
    width = max((len(n) for n in summary["instances_per_class"]), default=0)
    for name, count in summary["instances_per_class"].items():
        print(f"  {name:<{width}}  {count}")
    if summary["review_first"]:
        print(
            f"Review first (least certain first; every image in {outputs.out / REVIEW_NAME})"
            f"{data.note()}:"
        )
        for file_name, uncertainty in summary["review_first"]:
            print(f"  {uncertainty:.3f}  {file_name}")
