"""Score a trained head: ``python -m usam.eval ckpt=<head.ckpt> eval_data=voc_val sam=vit_h``.

The evaluation set becomes an embedding shard set first (SAM's automatic masks
with the ``amg`` settings), extracted on demand and cached under
``paths.data_dir/shards`` by the id of its images, SAM and settings, so the next
evaluation with the same SAM reuses it. With ``ckpt=null`` only that happens,
and the shard set's path is printed (the evaluation callback of ``usam.fit``
reads it). ``baseline=sam3`` scores SAM 3's own detections instead, written to
``sam3_detections/`` in the run folder. Results go to the Hydra run directory:
``metrics.json``, ``per_class.csv``, ``overlays/*.png``, ``sweep.csv`` and ``sweep.png``.
``trainer.devices=N`` scores the shard set over N DDP ranks that Lightning starts, with the
metrics of one process (a set too large for one within the process group's timeout).
"""

from __future__ import annotations

import logging
import pickle
import tempfile
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from lightning.fabric import Fabric
from omegaconf import DictConfig

from usam.cli import command_line_sets
from usam.commands.eval_data import eval_data_shards
from usam.commands.mask_settings import head_mask_settings
from usam.commands.run_identity import flat_config, run_identity
from usam.core.config import ConfigError, settings_from_config
from usam.core.devices import resolve_device
from usam.core.process_group import leave_process_group
from usam.core.provenance import report
from usam.data.extraction import ExtractSettings
from usam.data.rank_shares import RankShare
from usam.data.sources import ImageSource
from usam.evaluation.clip_baseline import ClipSettings, clip_predictor
from usam.evaluation.metrics import format_scalars
from usam.evaluation.reports import log_to_wandb, write_outputs
from usam.evaluation.sam3_baseline import Sam3Settings, sam3_baseline
from usam.evaluation.scoring import (
    SWEEP_ON_TEST,
    Evaluation,
    EvaluationError,
    ThresholdGrid,
    check_head_classes,
    evaluate,
    resolve_vocabulary,
)
from usam.inference.predictor import InferenceSettings, Predictor
from usam.sam.amg_settings import AmgSettings
from usam.sam.registry import SamSettings

log = logging.getLogger(__name__)
NOT_RESULTS = "these numbers check the evaluation pipeline and are NOT results"


def threshold_grid(cfg: DictConfig) -> ThresholdGrid | None:
    grid = ThresholdGrid(
        tuple(cfg.sweep.confidence_thresholds or ()), tuple(cfg.sweep.nms_ious or ())
    )
    return grid if grid.confidence_thresholds and grid.nms_ious else None


def _baseline(
    cfg: DictConfig, source: ImageSource, settings: InferenceSettings, device: Any
) -> tuple[Predictor, Path | None, dict[str, Any]]:
    """The ``cfg.baseline`` predictor, SAM 3's own shard set (None: SAM's automatic masks)
    and what ``metrics.json`` records of the baseline."""
    if cfg.ckpt:
        raise ConfigError(f"ckpt={cfg.ckpt} is a U-SAM head; the baseline takes none (ckpt=null)")
    if cfg.baseline.name == "sam3":
        sam3 = settings_from_config(Sam3Settings, cfg.baseline.sam3, "baseline.sam3")
        predictor, shards = sam3_baseline(sam3, source, settings, cfg.paths.output_dir, device)
        return predictor, shards, {"baseline": "sam3", "sam3": asdict(sam3)}
    clip = settings_from_config(ClipSettings, cfg.baseline.clip, "baseline.clip")
    predictor = clip_predictor(clip, source, settings, device)
    return predictor, None, {"baseline": cfg.baseline.name, "clip": asdict(clip)}


def _ranks(cfg: DictConfig) -> int:
    """``trainer.devices``, checked before anything is extracted."""
    devices = cfg.trainer.devices
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        raise ConfigError(f"trainer.devices={devices!r} must be a whole number of ranks >= 1")
    return devices


def _score(
    cfg: DictConfig, shards: Any, predictor: Predictor, options: dict[str, Any]
) -> Evaluation:
    """The evaluation in this process, or over ``trainer.devices`` DDP ranks that Lightning
    starts, each scoring its share; the metrics reduce over them, so rank zero's evaluation
    is the one-process result, and only this process writes the outputs."""
    devices = _ranks(cfg)
    if devices == 1:
        return evaluate(shards, predictor, progress=True, **options)
    fabric = Fabric(accelerator=cfg.trainer.accelerator, devices=devices, strategy="ddp_spawn")
    # Lightning walks a spawned rank's arguments as collections, refusing frozen dataclasses
    # (the settings), so they travel bound; rank zero's evaluation comes back through a file,
    # since the launcher's result pipe blocks on anything larger than its buffer (overlays)
    with tempfile.TemporaryDirectory() as handoff:
        result = Path(handoff) / "evaluation.pkl"
        fabric.launch(partial(_score_share, shards, predictor, options, result))
        return pickle.loads(result.read_bytes())


def _score_share(
    shards: Any, predictor: Predictor, options: dict[str, Any], result: Path, fabric: Fabric
) -> None:
    """One rank's part of :func:`_score`, on that rank's device; rank zero writes its
    evaluation to ``result``."""
    predictor.head.to(fabric.device)
    predictor.device = fabric.device
    share = RankShare(fabric.global_rank, fabric.world_size)
    evaluation = evaluate(shards, predictor, share=share, progress=fabric.is_global_zero, **options)
    if fabric.is_global_zero:
        result.write_bytes(pickle.dumps(evaluation))
    leave_process_group()


def _log_to_wandb(cfg: DictConfig, evaluation: Evaluation, out_dir: Path) -> None:
    import wandb

    identity = run_identity(cfg, "eval", evaluation.provenance)
    with wandb.init(
        project=cfg.wandb.project,
        mode=cfg.wandb.mode,
        dir=str(out_dir),
        name=identity.name,
        group=identity.group,
        job_type="eval",
        config=flat_config(cfg),
        tags=identity.tags,
    ) as wandb_run:
        scores = {f"eval/{name}": value for name, value in evaluation.scalars().items()}
        log_to_wandb(wandb_run, evaluation, "eval", scores)


def _show(label: str, evaluation: Evaluation, out_dir: Path) -> None:
    """The lines people read: the scores, where the sweep is, and the banner if needed."""
    derived = ""
    if evaluation.instances_derived:
        derived = " (mask AP on instances derived as connected components of the class map)"
    print(
        f"{label}: {format_scalars(evaluation.headline)}{derived}"
        f"  over {evaluation.images} images; results in {out_dir}"
    )
    if evaluation.sweep:
        print(
            f"threshold x NMS sweep ({len(evaluation.sweep)} points): {SWEEP_ON_TEST}; "
            f"{out_dir / 'sweep.csv'}"
        )
    report(evaluation.provenance, NOT_RESULTS)


def run(cfg: DictConfig) -> dict[str, Any] | None:
    """Evaluate ``cfg.ckpt``, or the ``cfg.baseline``; returns the contents of
    ``metrics.json`` (None with ckpt=null and no baseline).
    """
    source: ImageSource = instantiate(cfg.eval_data.source)
    settings = settings_from_config(InferenceSettings, cfg.inference, "inference")
    sam = settings_from_config(SamSettings, cfg.sam, "sam")
    amg = settings_from_config(AmgSettings, cfg.amg, "amg")
    extract = settings_from_config(ExtractSettings, cfg.extract, "extract")
    device = resolve_device(cfg.device, "device")
    _ranks(cfg)
    vocabulary = None
    shards = None  # SAM 3 brings its own masks; the others score SAM's automatic ones
    if cfg.get("baseline"):
        predictor, shards, extra = _baseline(cfg, source, settings, device)
        label = f"{cfg.baseline.name} on {cfg.eval_data.name}"
    elif cfg.ckpt:
        predictor = Predictor.from_checkpoint(cfg.ckpt, settings, device)
        predictor.checkpoint.check_sam(sam.model_type, EvaluationError)
        amg = head_mask_settings(amg, predictor.checkpoint, command_line_sets("amg"))
        vocabulary = resolve_vocabulary(predictor.classes, cfg.vocabulary)
        check_head_classes(vocabulary, source.classes, f"eval_data={cfg.eval_data.name}")
        label = cfg.eval_data.name
        extra = {"checkpoint": str(cfg.ckpt)}
    else:
        ready = eval_data_shards(cfg, source, sam, amg, extract)
        print(f"evaluation shard set ready: {ready}")
        return None
    shards = shards or eval_data_shards(cfg, source, sam, amg, extract)
    options = {"vocabulary": vocabulary, "sweep": threshold_grid(cfg), "source": source}
    evaluation = _score(cfg, shards, predictor, options | {"num_samples": cfg.num_overlays})
    out_dir = Path(cfg.paths.output_dir)
    extra |= {"eval_data": cfg.eval_data.name, "shards": str(shards)}
    metrics_path = write_outputs(evaluation, out_dir, extra)
    if cfg.wandb.enabled:
        _log_to_wandb(cfg, evaluation, out_dir)
    _show(label, evaluation, out_dir)
    log.info("metrics written to %s", metrics_path)
    return {**evaluation.summary(), **extra}
