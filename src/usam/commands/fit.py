"""Train the U-SAM head: ``python -m usam.fit experiment=voc_sd [stage=teacher|student|both]``,
or fine-tune a trained one on reviewed masks (``stage=finetune``: ``commands/finetune_stage``).

Everything a run writes lives under its Hydra output directory: the resolved
config, checkpoints per stage, and the logger files (W&B offline by default).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from usam.commands.eval_data import eval_data_shards
from usam.commands.fit_stopping import (
    EpochResume,
    cluster_plugins,
    resume_checkpoint,
    stoppable_fit,
)
from usam.commands.fit_values import check_fit_values
from usam.commands.run_identity import flat_config, run_identity
from usam.core import provenance
from usam.core.config import ConfigError, settings_from_config
from usam.core.process_group import leave_process_group
from usam.core.provenance import Provenance
from usam.core.vocabulary import load_vocabulary
from usam.data.extraction import ExtractSettings
from usam.evaluation.metrics import SCALARS
from usam.images.stable_diffusion import GenerateSettings
from usam.inference.predictor import InferenceSettings
from usam.sam.amg_settings import AmgSettings
from usam.sam.registry import SamSettings

STAGES = ("teacher", "student", "both", "finetune")
# what a run's metrics are when its data or models are untrained
NOT_RESULTS = "this run's metrics check the pipeline and are NOT results"


def _callbacks(
    cfg: DictConfig, stage: str, inference: InferenceSettings, eval_dir: Path | None
) -> list[Any]:
    """One object per entry of the callbacks group (``callbacks=none`` gives none), each
    built with what the run decides for it: a checkpoint callback writes into the stage's
    folder; the evaluation callback scores ``eval_dir`` with the run's typed ``inference``
    settings and writes under ``eval/<stage>``."""
    output_dir = Path(cfg.paths.output_dir)
    callbacks = []
    for name, entry in (cfg.callbacks or {}).items():
        if not entry:
            continue
        if name == "eval":
            made = instantiate(entry, _partial_=True)(
                shards_dir=eval_dir, inference=inference, output_dir=output_dir / "eval" / stage
            )
        elif issubclass(get_class(entry._target_), ModelCheckpoint):
            made = instantiate(entry, dirpath=str(output_dir / "checkpoints" / stage))
        else:
            made = instantiate(entry)
        callbacks.append(made)
    return callbacks


def data_settings_of(cfg: DictConfig) -> dict[str, Any]:
    """The settings the DataModule makes missing images and shards with, parsed once here."""
    return {
        "sam": settings_from_config(SamSettings, cfg.sam, "sam"),
        "amg": settings_from_config(AmgSettings, cfg.amg, "amg"),
        "generate": GenerateSettings.from_config(cfg.generate),
        "extract": settings_from_config(ExtractSettings, cfg.extract, "extract"),
    }


def stage_loggers(cfg: DictConfig, stage: str, data: Provenance) -> list[Any]:
    """The configured loggers for one stage. A W&B run carries the whole resolved config
    (dotted keys), a name and group that tell sweep jobs apart, and tags for the
    experiment, data source, SAM and random weights. Only rank zero has a W&B run (another
    rank's ``experiment`` is a stand-in), so the config goes through ``log_hyperparams``,
    which writes on rank zero alone."""
    loggers = []
    for name, entry in (cfg.logger or {}).items():
        if not entry:
            continue
        if name == "wandb":
            identity = run_identity(cfg, stage, data)
            tags = list(dict.fromkeys([*(entry.get("tags") or []), *identity.tags]))
            # absolute: W&B's writer is a service process, whose folder may not be this one's
            save_dir = str(Path(entry.save_dir).resolve())
            logger = instantiate(
                entry, name=identity.name, group=identity.group, tags=tags, save_dir=save_dir
            )
            logger.log_hyperparams(flat_config(cfg))
            loggers.append(logger)
        else:
            loggers.append(instantiate(entry, name=stage))
    return loggers


def finish_loggers(loggers: list[Any]) -> None:
    """W&B keeps one run per process open; close it so the next stage gets its own."""
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            logger.experiment.finish()


@dataclass(frozen=True)
class StageResult:
    checkpoint: Path  # what the next stage reads, and what was tested
    scores: dict[str, float]  # the test/* metrics of that checkpoint


def train_stage(
    cfg: DictConfig,
    stage: str,
    datamodule: Any,
    inference: InferenceSettings,
    eval_dir: Path | None,
    teacher_ckpt: str | None = None,
) -> StageResult:
    """Fit one stage, then test the checkpoint the next stage should read. The stage seeds
    itself first, so its numbers do not depend on what ran before it in this process
    (building images and shards, or finding them cached)."""
    L.seed_everything(cfg.seed, workers=True)
    classes = list(datamodule.classes)
    if stage == "teacher":
        module = instantiate(cfg.model.teacher, classes=classes)
    else:
        module = instantiate(cfg.model.student, teacher_checkpoint=teacher_ckpt)
        if module.classes != classes:
            raise ConfigError(
                f"teacher checkpoint {teacher_ckpt} was trained on {len(module.classes)} classes "
                f"({module.classes[:5]}...), the run has {len(classes)} ({classes[:5]}...)"
            )
    ckpt_dir = Path(cfg.paths.output_dir) / "checkpoints" / stage
    callbacks = [*_callbacks(cfg, stage, inference, eval_dir), EpochResume(ckpt_dir, cfg.seed)]
    loggers = stage_loggers(cfg, stage, datamodule.provenance)
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        enable_checkpointing=True,  # callbacks=none: only EpochResume's and the final one below
        **cluster_plugins(),
    )
    try:
        resume = resume_checkpoint(ckpt_dir)  # a stopped run's last finished epoch
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None)
        best = next(
            (
                c.best_model_path
                for c in callbacks
                if isinstance(c, ModelCheckpoint) and c.best_model_path
            ),
            "",
        )
        checkpoint = Path(best) if best else ckpt_dir / "final.ckpt"
        if not best:
            trainer.save_checkpoint(checkpoint)
        # test/* metrics (and the evaluation callback's scores) for the head the next stage reads
        tested = trainer.test(
            module, datamodule=datamodule, ckpt_path=str(checkpoint), verbose=False
        )
    finally:
        finish_loggers(loggers)
    return StageResult(checkpoint, {k: float(v) for k, v in (tested[0] if tested else {}).items()})


SUMMARY_COLUMNS = {  # test metric: (column, format); the evaluation metrics' headline ones
    **{f"test/{name}": (name, form) for name, form in SCALARS.items()},
    "test/image_acc": ("image acc", "{:.3f}"),
}


@rank_zero_only
def _print_summary(output_dir: Path, results: dict[str, StageResult], data: Provenance) -> None:
    """The ending people read: each stage's tested checkpoint, its scores, where files are,
    then ``<stage> checkpoint: <absolute path>`` per stage for scripts to read (the final
    checkpoint each stage chose), and a random-weight run's note last. Both paths are
    resolved: Lightning resolves its checkpoint paths, while ``output_dir`` is as the config
    gives it (``paths.output_dir=run`` is relative)."""
    rows = [["stage", "tested checkpoint", *(column for column, _ in SUMMARY_COLUMNS.values())]]
    for stage, result in results.items():
        shown = [
            "-" if key not in result.scores else form.format(result.scores[key])
            for key, (_, form) in SUMMARY_COLUMNS.items()
        ]
        tested = result.checkpoint.resolve().relative_to(output_dir.resolve())
        rows.append([stage, str(tested), *shown])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["", f"usam.fit finished: {output_dir}"]
    lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    for stage in results:
        metrics = sorted((output_dir / "eval" / stage).glob("test-*/metrics.json"))
        if metrics:
            lines.append(f"  {stage} scores and overlays: {metrics[-1].parent}")
    lines += [f"{stage} checkpoint: {done.checkpoint.resolve()}" for stage, done in results.items()]
    if data.random_weights:  # last, so that no one reads the numbers above without it
        lines.append(f"  {NOT_RESULTS}{data.note()}")
    print("\n".join(lines))


def _evaluation_shards(cfg: DictConfig, data_settings: dict[str, Any]) -> Path | None:
    """The shard set the evaluation callback scores: its own ``shards_dir``, else
    ``eval_data``'s, extracted if missing; None without the callback."""
    callback = (cfg.callbacks or {}).get("eval")
    if callback is None:
        return None
    if callback.shards_dir:
        return Path(callback.shards_dir)
    if not cfg.get("eval_data"):
        raise ConfigError(
            "callbacks include eval but there is nothing to evaluate on: set eval_data=<dataset> "
            "(conf/eval_data) or callbacks.eval.shards_dir=<an eval shard set's eval folder>"
        )
    source = instantiate(cfg.eval_data.source)
    return eval_data_shards(
        cfg, source, data_settings["sam"], data_settings["amg"], data_settings["extract"]
    )


def run(cfg: DictConfig) -> dict[str, Path]:
    """Run the configured stages; returns the checkpoint of each."""
    check_fit_values(cfg)
    if cfg.stage not in STAGES:
        raise ConfigError(f"stage={cfg.stage!r} must be one of {STAGES}")
    if cfg.stage == "finetune":  # imported here: it builds on this module's loggers
        from usam.commands.finetune_stage import run_finetune

        return run_finetune(cfg)
    if cfg.stage == "student" and not (cfg.teacher_ckpt and Path(cfg.teacher_ckpt).is_file()):
        raise ConfigError(  # before any images or shards are made for a run that cannot train
            f"stage=student needs a teacher checkpoint, and teacher_ckpt={cfg.teacher_ckpt} is "
            "not a file: set it to one from checkpoints/teacher of a fit run"
        )
    load_vocabulary(cfg.data.classes)  # fail early on a bad class list
    data_settings = data_settings_of(cfg)
    inference = settings_from_config(InferenceSettings, cfg.inference, "inference")
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    eval_dir = _evaluation_shards(cfg, data_settings)
    datamodule = instantiate(cfg.data, _partial_=True)(**data_settings)
    datamodule.prepare_data()
    datamodule.setup("fit")
    rank_zero_only(provenance.report)(datamodule.provenance, NOT_RESULTS)
    results: dict[str, StageResult] = {}
    with stoppable_fit(output_dir, cfg.trainer.max_epochs):
        if cfg.stage in ("teacher", "both"):
            results["teacher"] = train_stage(cfg, "teacher", datamodule, inference, eval_dir)
        if cfg.stage in ("student", "both"):
            teacher = results["teacher"].checkpoint if "teacher" in results else cfg.teacher_ckpt
            teacher_ckpt = str(teacher) if teacher else None
            results["student"] = train_stage(
                cfg, "student", datamodule, inference, eval_dir, teacher_ckpt
            )
    _print_summary(output_dir, results, datamodule.provenance)
    leave_process_group()
    return {stage: result.checkpoint for stage, result in results.items()}
