"""Config groups become typed settings once, and a wrong key or type is named with its fix."""

from __future__ import annotations

import dataclasses

import pytest

from usam.commands.fit import run
from usam.core.config import ConfigError, settings_from_config
from usam.data.extraction import ExtractSettings
from usam.inference.predictor import InferenceSettings
from usam.sam.amg_settings import AmgSettings
from usam.sam.registry import SamSettings

from helpers.commands import compose_config, run_python


def test_a_misspelt_key_is_named_with_the_key_it_resembles():
    with pytest.raises(
        ConfigError, match=r"unknown key amg\.point_per_side; did you mean amg\.points_per_side"
    ):
        settings_from_config(AmgSettings, {"point_per_side": 8}, "amg")


def test_a_key_like_no_other_lists_the_valid_ones():
    with pytest.raises(
        ConfigError, match=r"unknown key inference\.zzz; valid keys: confidence_threshold"
    ):
        settings_from_config(InferenceSettings, {"zzz": 1}, "inference")


@pytest.mark.parametrize(
    ("cls", "values", "group", "message"),
    [
        (
            AmgSettings,
            {"points_per_side": "32"},
            "amg",
            r"amg\.points_per_side='32' .* expected int",
        ),
        (AmgSettings, {"hq_token_only": 1}, "amg", r"amg\.hq_token_only=1 .* expected bool"),
        (InferenceSettings, {"confidence_threshold": True}, "inference", "expected float"),
        (SamSettings, {"checkpoint": 3}, "sam", r"sam\.checkpoint=3 has the wrong type"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused(cls, values, group, message):
    with pytest.raises(ConfigError, match=message):
        settings_from_config(cls, values, group)


def test_checks_of_the_settings_name_their_group():
    with pytest.raises(
        ConfigError, match=r"inference: confidence_threshold=1.5 must be in \[0, 1\]"
    ):
        settings_from_config(InferenceSettings, {"confidence_threshold": 1.5}, "inference")
    with pytest.raises(ConfigError, match=r"sam: unknown SAM model type 'vit_x'"):
        settings_from_config(SamSettings, {"model_type": "vit_x"}, "sam")
    with pytest.raises(ConfigError, match=r"extract: val_fraction=1.0 must be in \[0, 1\)"):
        settings_from_config(ExtractSettings, {"val_fraction": 1.0}, "extract")


def test_the_composed_groups_become_typed_fields():
    cfg = compose_config("eval", ["amg.points_per_side=8", "inference.confidence_threshold=0.7"])
    amg = settings_from_config(AmgSettings, cfg.amg, "amg")
    inference = settings_from_config(InferenceSettings, cfg.inference, "inference")
    extract = settings_from_config(ExtractSettings, cfg.extract, "extract")
    assert amg.points_per_side == 8 and isinstance(amg.crop_overlap_ratio, float)
    assert inference.confidence_threshold == 0.7
    assert isinstance(extract.trainer, dict) and extract.trainer["devices"] == 1
    assert dataclasses.asdict(settings_from_config(AmgSettings, {}, "amg")) == dataclasses.asdict(
        AmgSettings()
    )


def test_fit_stops_on_a_misspelt_key_before_any_work(tmp_path):
    cfg = compose_config(
        "fit",
        [
            f"paths.root_dir={tmp_path}",
            f"paths.output_dir={tmp_path / 'run'}",
            "+amg.point_per_side=8",
        ],
    )
    with pytest.raises(ConfigError, match=r"did you mean amg\.points_per_side"):
        run(cfg)
    assert not (tmp_path / "data").exists()


def test_the_command_line_names_the_key_and_leaves_no_run_folder(tmp_path):
    failed = run_python("-m", "usam.fit", "+amg.point_per_side=8", "logger=none", cwd=tmp_path)
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines()[-1] == (
        "usam.fit: error: unknown key amg.point_per_side; did you mean amg.points_per_side"
    )
    assert "Traceback" not in failed.stderr
    assert not (tmp_path / "outputs").exists()
