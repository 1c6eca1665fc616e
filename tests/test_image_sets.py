"""One naming of image sets (``<vocabulary>_<source>``) for generate, ingest, extract and fit,
and the missing-set error that lists the sets there are with what selects each."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import InstantiationException
from hydra.utils import instantiate

import usam.commands.extract as extract_command
import usam.commands.generate as generate_command
from usam.command_errors import user_error_line
from usam.core.vocabulary import load_vocabulary
from usam.data.sources import FolderSource
from usam.formats.image_shards import ImageShardWriter
from usam.images.image_sets import MissingImageSetError, image_set_dir, require_image_set
from usam.images.ingest_settings import IngestSettings
from usam.testing.tiny_diffusion import save_tiny_pipeline

from helpers.commands import compose_config
from helpers.official_amg import photo_folder

PETS = ["cat", "dog"]


def _empty_set(directory: Path, vocabulary: str, classes: list[str], source: str = "web") -> None:
    with ImageShardWriter(directory, vocabulary=vocabulary, classes=classes, source=source):
        pass


def test_a_set_is_named_after_its_vocabulary_and_source(tmp_path):
    assert image_set_dir(tmp_path, load_vocabulary("voc20"), "sd") == tmp_path / "voc20_sd"
    one = image_set_dir(tmp_path, load_vocabulary(PETS), "sd").name
    other = image_set_dir(tmp_path, load_vocabulary(["cat", "car"]), "sd").name
    assert one.startswith("custom-") and one.endswith("_sd") and one != other
    assert FolderSource(photo_folder(tmp_path / "photos", 1), "voc20").name == "voc20_folder"


def test_every_ingest_fills_the_photo_set_the_web_experiments_read():
    read = {compose_config("fit", [f"experiment={e}"]).data.source for e in ("voc_wc", "coco_wc")}
    for kind in ("web", "folder", "openverse", "wikimedia"):
        assert {compose_config("ingest", [f"ingest={kind}"]).ingest.name} == read == {"web"}, kind
    assert IngestSettings().name == "web"  # the same without the config


def test_a_missing_set_lists_the_sets_there_and_what_selects_each(tmp_path):
    voc = load_vocabulary("voc20")
    with pytest.raises(MissingImageSetError, match=r"holds no image set yet; make this one with "):
        require_image_set(tmp_path, voc, "web")
    _empty_set(tmp_path / "voc20_web", "voc20", list(voc.classes))
    _empty_set(tmp_path / "coco80_sd", "coco80", list(load_vocabulary("coco80").classes), "sd")
    _empty_set(image_set_dir(tmp_path, load_vocabulary(PETS), "mine"), "custom", PETS)
    _empty_set(tmp_path / "elsewhere", "voc20", list(voc.classes))  # no name selects it
    with pytest.raises(MissingImageSetError) as caught:
        require_image_set(tmp_path, voc, "sd")
    message = str(caught.value)
    assert message.startswith(f"data.source=sd: no finished image set voc20_sd in {tmp_path}; ")
    listed = message.split("image sets there: ")[1].split(". Select one of those")[0].split("; ")
    assert listed == [
        "coco80_sd (data.classes=coco80 data.source=sd)",
        f"{image_set_dir(tmp_path, load_vocabulary(PETS), 'mine').name} "
        "(data.classes=[cat,dog] data.source=mine)",
        "voc20_web (data.source=web)",
    ]
    assert message.endswith("`python -m usam.generate data.classes=voc20`")
    assert require_image_set(tmp_path, voc, "web") == tmp_path / "voc20_web"


def test_tiny_generated_images_are_found_by_the_source_the_error_names(tmp_path):
    """The README's path: ``generate=tiny``, then ``extract``, which names ``data.source``."""
    paths = [
        f"paths.root_dir={tmp_path}",
        f"paths.output_dir={tmp_path / 'run'}",
        "data.classes=[cat,dog]",
    ]
    model = save_tiny_pipeline(tmp_path / "tiny_sd")
    generated = generate_command.run(
        compose_config(
            "generate", [*paths, "generate=tiny", f"generate.model={model}", "generate.per_class=1"]
        )
    )
    assert generated == image_set_dir(
        tmp_path / "data" / "images", load_vocabulary(PETS), "sd_tiny"
    )
    with pytest.raises(InstantiationException) as caught:
        instantiate(compose_config("extract", paths).source)  # data.source=sd by default
    line = user_error_line(caught.value)
    assert line.startswith("data.source=sd: no finished image set custom-")  # one line, no prefix
    assert f"image sets there: {generated.name} (data.source=sd_tiny, random weights)" in line
    assert line.endswith(
        "Select one of those, or make this one with `python -m usam.generate data.classes=...`"
    )

    tiny = ["sam=tiny", "amg.points_per_side=4", "extract.num_workers=0"]
    fast = ["extract.trainer.accelerator=cpu", "extract.trainer.enable_progress_bar=false"]
    extract_command.run(compose_config("extract", [*paths, "data.source=sd_tiny", *tiny, *fast]))
    shards = [p.name for p in (tmp_path / "data" / "shards").iterdir()]
    assert len(shards) == 1 and shards[0].startswith(f"{generated.name}-tiny-")
