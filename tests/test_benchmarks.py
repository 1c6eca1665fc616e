"""The benchmark scripts still run, and the numbers they print agree with one another: each
ratio is the ratio of the printed speeds, each stage total lies within the time measured
around the whole call, counts are the known ones. No speed itself is checked."""

from __future__ import annotations

from usam.formats.embedding_shards import read_manifest
from usam.testing.agreement import SCORE_RTOL

from helpers.commands import ROOT, run_python

ROUNDING = 0.005  # of a value printed with two decimals


def extraction_tables(stdout: str) -> tuple[dict[str, str], dict[str, float], float]:
    """The first row of the agreement table, of the stage table, and the official encoder's
    seconds per image."""
    names = (
        "pass iou_thr official_ips ours_ips ratio ratio_without_encoder official_mb ours_mb "
        "masks contract identical max_diou"
    ).split()
    row = stdout.split("official generator against ours")[1].splitlines()[2].split()
    agreement = dict(zip(names, row, strict=True))
    stage_row = stdout.split("ours by stage")[1].splitlines()[3].split()
    stages = dict(zip(("encoder", "decoder", "post", "total"), map(float, stage_row[1:5])))
    encoder = float(stdout.split("official image encoder alone: ")[1].split()[0])
    return agreement, stages, encoder


def assert_printed_numbers_agree(stdout: str) -> dict[str, str]:
    """Each derived column against the printed values it comes from, within their rounding
    (img/s has four decimals: 1e-3 of relative slack covers rates above 0.05)."""
    agreement, stages, official_encoder = extraction_tables(stdout)
    official_s, ours_s = 1 / float(agreement["official_ips"]), 1 / float(agreement["ours_ips"])
    ratio = official_s / ours_s
    assert abs(float(agreement["ratio"]) - ratio) <= ROUNDING + 1e-3 * ratio, agreement
    # the engine times its stages inside each call the benchmark times as a whole
    assert stages["total"] <= ours_s * 1.001 + ROUNDING, (stages, ours_s)
    assert stages["total"] >= ours_s / 2 - ROUNDING, (stages, ours_s)  # all but the result
    numerator, denominator = official_s - official_encoder, ours_s - stages["encoder"]
    slack = ROUNDING + 1e-3 * max(official_s, ours_s)
    assert denominator > slack, (stages, ours_s)
    low = (numerator - slack) / (denominator + slack) - ROUNDING
    high = (numerator + slack) / (denominator - slack) + ROUNDING
    assert low <= float(agreement["ratio_without_encoder"]) <= high, (agreement, low, high)
    assert agreement["contract"] == "True" and agreement["pass"] == "100%"
    # the contract's predicted-IoU tolerance; the tiny models' IoUs stay below 1
    assert float(agreement["max_diou"]) <= SCORE_RTOL
    return agreement


def test_extraction_benchmark_prints_speed_and_agreement():
    result = run_python(
        str(ROOT / "benchmarks" / "extract_speed.py"),
        *("--model", "tiny", "--images", "2", "--points-per-side", "4"),
        *("--proposals", "one_per_point"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "official img/s" in result.stdout
    agreement = assert_printed_numbers_agree(result.stdout)
    assert agreement["masks"] == "32/32"  # every point's mask, 4 x 4 per image, on both sides
    assert "RANDOM WEIGHTS" in result.stdout
    assert "ours by stage, s/image [random weights]" in result.stdout
    assert "FLOP floor: usam's FLOPs for 16 points" in result.stdout
    assert "MB/image [random weights]" in result.stdout
    flops = {
        line.split()[1]: float(line.split("decoder ")[1].split()[0])
        for line in result.stdout.splitlines()
        if line.startswith("FLOPs ")
    }
    assert set(flops) == {"official:", "usam:"}
    assert 0 < flops["usam:"] < flops["official:"]  # the reordered decoder does less


def test_extraction_benchmark_runs_sam2_against_its_own_generator():
    result = run_python(
        str(ROOT / "benchmarks" / "extract_speed.py"),
        *("--model", "sam2.1_tiny", "--images", "1", "--points-per-side", "2"),
        *("--pass-rates", "1", "--stability-thresh", "0"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model=sam2.1_tiny random_weights=True" in result.stdout
    agreement = assert_printed_numbers_agree(result.stdout)
    official, ours = map(int, agreement["masks"].split("/"))
    assert official > 0 and ours > 0  # the agreement is measured on masks
    assert "FLOP floor: usam's FLOPs for 4 points" in result.stdout


def test_training_benchmark_prints_throughput_per_worker_count(tmp_path):
    result = run_python(
        str(ROOT / "benchmarks" / "train_speed.py"),
        *("--per-class", "2", "--workers", "0", "2", "--data", str(tmp_path)),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = read_manifest(tmp_path / "voc20-n2" / "train")
    images, masks = manifest.num_images, manifest.num_masks
    assert images == 20 * 2  # 20 classes, 2 each, in one shard of up to 200
    assert f"train set: 40 images, {masks} masks, 1 shards" in result.stdout
    rows = [line.split() for line in result.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["0", "2"]
    for _, seconds, images_per_s, masks_per_s, _ in rows:
        # both rates (printed as integers) over the one epoch time: in the set's proportion
        expected = float(images_per_s) * masks / images
        assert abs(float(masks_per_s) - expected) <= 0.5 + 0.5 * masks / images
        if float(seconds) > 0.1:  # s/epoch has one decimal
            fastest, slowest = images / (float(seconds) - 0.05), images / (float(seconds) + 0.05)
            assert slowest - 0.5 <= float(images_per_s) <= fastest + 0.5, (seconds, images_per_s)
    assert "evaluation (Predictor, threshold + NMS)" in result.stdout
    assert "SYNTHETIC embeddings" in result.stdout
