"""What an evaluation leaves for people: metrics.json, per_class.csv, sweep.csv and its plot,
overlay PNGs, and the same as tables and images in a W&B run."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from usam.evaluation.metrics import PER_CLASS_COLUMNS, SCALARS
from usam.evaluation.scoring import (
    SWEEP_COLUMNS,
    SWEEP_ON_TEST,
    Evaluation,
    SweepPoint,
)
from usam.viz.overlays import heatmaps, overlay_panel


def sweep_maps(points: Sequence[SweepPoint]) -> tuple[list[float], list[float], dict]:
    """Rows (confidence), columns (NMS IoU) and one grid per headline metric of a sweep."""
    rows = sorted({p.confidence_threshold for p in points})
    columns = sorted({p.nms_iou for p in points})
    grids = {name: np.full((len(rows), len(columns)), np.nan) for name in SCALARS}
    for p in points:
        r, c = rows.index(p.confidence_threshold), columns.index(p.nms_iou)
        for name, value in p.scores.items():
            grids[name][r, c] = value
    return rows, columns, grids


def sweep_plot(points: Sequence[SweepPoint]):
    rows, columns, grids = sweep_maps(points)
    return heatmaps(rows, columns, grids, row_name="confidence threshold", column_name="NMS IoU")


def overlay_images(evaluation: Evaluation) -> list[tuple[str, Any]]:
    """(key, PIL panel) per kept sample."""
    names = evaluation.names
    return [
        (s.key, overlay_panel(s.image, s.truth, s.prediction, names, title=s.key))
        for s in evaluation.samples
    ]


def write_outputs(evaluation: Evaluation, out_dir: str | Path, extra: dict | None = None) -> Path:
    """``metrics.json``, ``per_class.csv``, ``overlays/*.png`` and, with a sweep,
    ``sweep.csv`` and ``sweep.png``; returns the metrics path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = out_dir / "metrics.json"
    metrics.write_text(json.dumps({**evaluation.summary(), **(extra or {})}, indent=2))
    random_weights = evaluation.provenance.random_weights  # a column: no row reads as a result
    with open(out_dir / "per_class.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class", *PER_CLASS_COLUMNS, "random_weights"])
        for score in evaluation.per_class:
            cells = [_cell(value) for value in score.values.values()]
            writer.writerow([score.name, *cells, random_weights])
    if evaluation.sweep:
        with open(out_dir / "sweep.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow([*SWEEP_COLUMNS, "random_weights", "analysis"])
            for p in evaluation.sweep:
                row = [p.confidence_threshold, p.nms_iou, *map(_cell, p.scores.values())]
                writer.writerow([*row, random_weights, SWEEP_ON_TEST])
        sweep_plot(evaluation.sweep).save(out_dir / "sweep.png")
    write_overlays(evaluation, out_dir / "overlays")
    return metrics


def write_overlays(evaluation: Evaluation, out_dir: str | Path) -> list[Path]:
    out_dir = Path(out_dir)
    paths = []
    for key, panel in overlay_images(evaluation):
        out_dir.mkdir(parents=True, exist_ok=True)
        paths.append(out_dir / f"{key}.png")
        panel.save(paths[-1])
    return paths


def _cell(value: float) -> str:
    return f"{value:.6g}" if math.isfinite(value) else ""


def _table_value(value: float) -> float | None:
    return value if math.isfinite(value) else None


def log_to_wandb(
    run: Any, evaluation: Evaluation, prefix: str, extra: dict[str, Any] | None = None
) -> None:
    """Per-class table, overlay table and sweep (table and plot) into an active W&B run,
    each marked with whether the numbers come from random weights; ``extra`` joins the
    same log call (e.g. Lightning's ``trainer/global_step``)."""
    import wandb  # a runtime dependency; imported here because most callers have no run

    names = evaluation.names
    labels = {i: name for i, name in enumerate(names)} | {255: "void"}
    random = evaluation.provenance.random_weights
    payload: dict[str, Any] = {
        **evaluation.provenance.scalars(prefix),
        f"{prefix}/per_class": wandb.Table(
            columns=["class", *PER_CLASS_COLUMNS, "random_weights"],
            data=[
                [s.name, *map(_table_value, s.values.values()), random]
                for s in evaluation.per_class
            ],
        ),
    }
    if evaluation.samples:
        # lists of images, not a table of them: an offline run keeps a table's images only
        # as the word "Image", while listed images are saved into the run's folder
        panels = overlay_images(evaluation)
        payload[f"{prefix}/overlays"] = [wandb.Image(panel, caption=key) for key, panel in panels]
        payload[f"{prefix}/overlays_interactive"] = [
            wandb.Image(
                sample.image,
                caption=sample.key,
                masks={
                    "ground_truth": {"mask_data": sample.truth, "class_labels": labels},
                    "prediction": {"mask_data": sample.prediction, "class_labels": labels},
                },
            )
            for sample in evaluation.samples
        ]
    if evaluation.sweep:
        payload[f"{prefix}/sweep"] = wandb.Table(
            columns=[*SWEEP_COLUMNS, "random_weights", "analysis"],
            data=[[*map(_table_value, p.row()), random, SWEEP_ON_TEST] for p in evaluation.sweep],
        )
        payload[f"{prefix}/sweep_plot"] = wandb.Image(sweep_plot(evaluation.sweep))
    run.log({**payload, **(extra or {})})
