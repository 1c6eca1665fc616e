"""The trainer and data values of ``usam.fit`` are typed like every other setting: a wrong one
ends in one line naming the key, exit code 2, before anything is made or any rank starts."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from usam.commands.fit_values import DATA_COUNTS, TRAINER_COUNTS
from usam.core.config import ConfigError, Count, check_target_arguments

from helpers.commands import CONF_DIR, compose_config, run_entry

# (override, what the one line must say); DDP on two ranks, so that a value checked only
# once Lightning builds its Trainer would start the process group first
WRONG = [
    ("trainer.max_epochs=abc", "trainer.max_epochs='abc' has the wrong type: expected int or None"),
    ("trainer.max_epochs=2.5", "trainer.max_epochs=2.5 has the wrong type: expected int or None"),
    ("trainer.devices=0", "trainer.devices=0 is out of range: at least 1, or -1 (all)"),
    ("trainer.num_nodes=0", "trainer.num_nodes=0 is out of range: at least 1"),
    ("trainer.precision=33", "trainer.precision=33 has the wrong type: expected 64 or 32 or 16"),
    ("trainer.enable_progress_bar=maybe", "trainer.enable_progress_bar='maybe' has the wrong"),
    ("+trainer.max_epoch=3", "unknown key trainer.max_epoch; did you mean trainer.max_epochs"),
    ("data.batch_size=-3", "data.batch_size=-3 is out of range: at least 1"),
    ("data.batch_size=big", "data.batch_size='big' has the wrong type: expected int"),
    ("data.num_workers=-1", "data.num_workers=-1 is out of range: at least 0"),
    ("data.shuffle_buffer=0", "data.shuffle_buffer=0 is out of range: at least 1"),
    ("+data.bach_size=4", "unknown key data.bach_size; did you mean data.batch_size"),
]


@pytest.mark.parametrize(("override", "said"), WRONG, ids=[o for o, _ in WRONG])
def test_a_wrong_trainer_or_data_value_is_one_line_naming_it(override, said, tmp_path):
    args = ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "logger=none"]
    code, stderr = run_entry("fit", *args, override, cwd=tmp_path)
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("usam.fit: error: "), stderr
    assert said in lines[0], lines[0]
    assert not dist.is_initialized()  # no process group was started
    assert not (tmp_path / "data").exists()  # no synthetic shards were written
    assert not (tmp_path / "outputs").exists()  # nor a failed run folder left behind


SHIPPED = ["", *(f"experiment={p.stem}" for p in sorted((CONF_DIR / "experiment").glob("*")))]


@pytest.mark.parametrize("trainer", sorted(p.stem for p in (CONF_DIR / "trainer").glob("*.yaml")))
@pytest.mark.parametrize("experiment", SHIPPED)
def test_every_shipped_trainer_and_data_config_passes(experiment, trainer, tmp_path):
    """The checks know every key the shipped configs set (the Trainer's and the
    DataModule's parameters), and none of their values is out of range."""
    overrides = [f"trainer={trainer}", f"paths.output_dir={tmp_path}"]
    cfg = compose_config("fit", [experiment, *overrides] if experiment else overrides)
    check_target_arguments(cfg.trainer, "trainer", TRAINER_COUNTS)
    check_target_arguments(cfg.data, "data", DATA_COUNTS)


def test_a_count_takes_its_minimum_and_its_special_values_only():
    devices = Count(1, ((-1, "all"),))
    assert [v for v in range(-3, 4) if devices.allows(v)] == [-1, 1, 2, 3]
    assert devices.describe() == "at least 1, or -1 (all)"


def test_a_callable_target_is_checked_by_its_signature():
    config = {"_target_": "usam.testing.synthetic.write_synthetic_shard_set", "seed": "one"}
    with pytest.raises(ConfigError, match=r"^synthetic.seed='one' has the wrong type"):
        check_target_arguments(config, "synthetic", {})
    config = {**config, "seed": 1, "images_per_shard": 0}
    with pytest.raises(ConfigError, match=r"images_per_shard=0 is out of range: at least 1$"):
        check_target_arguments(config, "synthetic", {"images_per_shard": Count(1)})
    check_target_arguments({**config, "images_per_shard": 3}, "synthetic", {})
