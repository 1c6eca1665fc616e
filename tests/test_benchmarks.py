"""The benchmark scripts still run and print their tables (tiny settings; no timing checked)."""

from __future__ import annotations

from helpers.commands import ROOT, run_python


def test_extraction_benchmark_prints_speed_and_agreement():
    result = run_python(
        str(ROOT / "benchmarks" / "extract_speed.py"),
        "--model",
        "tiny",
        "--images",
        "1",
        "--points-per-side",
        "4",
        "--pass-rates",
        "1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "official img/s" in result.stdout
    row = result.stdout.split("official generator against ours")[1].splitlines()[2].split()
    contract, identical, max_diou = row[-3:]
    assert contract == "True" and identical.endswith("%") and float(max_diou) >= 0
    assert "RANDOM WEIGHTS" in result.stdout
    assert "ours by stage, s/image [random weights]" in result.stdout
    assert "FLOP floor:" in result.stdout and "x floor" in result.stdout
    flops = {
        line.split()[1]: float(line.split("decoder ")[1].split()[0])
        for line in result.stdout.splitlines()
        if line.startswith("FLOPs ")
    }
    assert set(flops) == {"official:", "usam:"}
    assert 0 < flops["usam:"] < flops["official:"]  # the reordered decoder does less
    stages = result.stdout.split("ours by stage")[1].splitlines()[3].split()
    encoder, decoder, post, total = map(float, stages[1:5])
    assert abs(encoder + decoder + post - total) < 0.02 and min(encoder, decoder, post) >= 0


def test_extraction_benchmark_runs_sam2_against_its_own_generator():
    result = run_python(
        str(ROOT / "benchmarks" / "extract_speed.py"),
        *("--model", "sam2.1_tiny", "--images", "1", "--points-per-side", "2"),
        *("--pass-rates", "1", "--stability-thresh", "0"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model=sam2.1_tiny random_weights=True" in result.stdout
    row = result.stdout.split("official generator against ours")[1].splitlines()[2].split()
    assert row[-3] == "True" and float(row[4]) > 0  # the contract holds; a speed ratio
    assert "official image encoder alone" in result.stdout and "x floor" in result.stdout


def test_training_benchmark_prints_throughput_per_worker_count(tmp_path):
    result = run_python(
        str(ROOT / "benchmarks" / "train_speed.py"),
        "--per-class",
        "2",
        "--workers",
        "0",
        "2",
        "--data",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["0", "2"]
    assert "evaluation (Predictor, threshold + NMS)" in result.stdout
    assert "SYNTHETIC embeddings" in result.stdout
