"""The image shard format: round trip, resume, crash salvage, corruption and image modes."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from usam.formats.image_shards import (
    MANIFEST_NAME,
    ImageShardError,
    ImageShardWriter,
    encode_jpeg,
    iter_images,
    read_image_manifest,
    sha256,
    to_rgb,
)
from usam.viz.contact_sheet import write_contact_sheets

CLASSES = ["cat", "dining table"]


def _jpeg(seed: int, size: tuple[int, int] = (24, 16)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return encode_jpeg(Image.fromarray(pixels))


def _meta(index: int) -> dict:
    class_index = index % 2
    return {
        "class_name": CLASSES[class_index],
        "class_index": class_index,
        "source": "sd",
        "prompt": f"a photo of a {CLASSES[class_index]}",
        "seed": index,
    }


def _writer(directory, **options) -> ImageShardWriter:
    return ImageShardWriter(
        directory,
        vocabulary="custom",
        classes=CLASSES,
        source="sd",
        images_per_shard=options.pop("images_per_shard", 3),
        **options,
    )


def _write(writer: ImageShardWriter, indices) -> None:
    for i in indices:
        writer.write(f"img-{i:03d}", _jpeg(i), _meta(i))


def test_round_trip_across_shards(tmp_path):
    with _writer(tmp_path, config={"per_class": 4}, random_weights=True) as writer:
        _write(writer, range(8))
    manifest = read_image_manifest(tmp_path)
    assert manifest.num_images == 8 and len(manifest.shards) == 3
    assert manifest.per_class == {"cat": 4, "dining table": 4}
    assert manifest.random_weights and manifest.config == {"per_class": 4}
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["counts"]["images"] == 8
    samples = list(iter_images(tmp_path))
    assert [key for key, _, _ in samples] == [f"img-{i:03d}" for i in range(8)]
    for i, (_, image, meta) in enumerate(samples):
        assert image.mode == "RGB" and image.size == (24, 16)
        assert meta["seed"] == i and meta["class_name"] == CLASSES[i % 2]
        assert meta["sha256"] == sha256(_jpeg(i))
        expected = np.asarray(Image.open(io.BytesIO(_jpeg(i))).convert("RGB"))
        assert np.array_equal(np.asarray(image), expected)
    with tarfile.open(tmp_path / manifest.shards[0]["name"]) as tar:
        assert tar.getnames() == [f"img-00{i}.{ext}" for i in range(3) for ext in ("jpg", "json")]


def test_exception_keeps_written_images_and_resume_completes(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), _writer(tmp_path) as writer:
        _write(writer, range(5))
        raise RuntimeError("boom")
    assert not (tmp_path / MANIFEST_NAME).exists()
    assert not list(tmp_path.glob("*.tmp"))
    with _writer(tmp_path) as writer:
        assert set(writer.done) == {f"img-{i:03d}" for i in range(5)}
        _write(writer, (i for i in range(8) if f"img-{i:03d}" not in writer.done))
    keys = [key for key, _, _ in iter_images(tmp_path)]
    assert sorted(keys) == [f"img-{i:03d}" for i in range(8)]


def test_crash_salvages_complete_samples_of_the_open_shard(tmp_path):
    writer = _writer(tmp_path, images_per_shard=100)
    _write(writer, range(4))  # flushed but never closed, as when the process is killed
    tmp = next(tmp_path.glob("*.tar.tmp"))
    data = tmp.read_bytes()
    last_jpeg = data.rindex(b"img-003.jpg")
    tmp.write_bytes(data[: last_jpeg + 700])  # cut inside the last image
    with _writer(tmp_path) as resumed:
        assert set(resumed.done) == {"img-000", "img-001", "img-002"}
        _write(resumed, [3])
    assert sorted(k for k, _, _ in iter_images(tmp_path)) == [f"img-{i:03d}" for i in range(4)]
    assert not list(tmp_path.glob("*.tmp"))


def test_finished_set_reopens_for_more_and_rejects_other_classes(tmp_path):
    with _writer(tmp_path) as writer:
        _write(writer, range(2))
    with _writer(tmp_path) as writer:
        assert len(writer.done) == 2
        with pytest.raises(ImageShardError, match="already in"):
            _write(writer, [1])
        _write(writer, [2])
    assert read_image_manifest(tmp_path).num_images == 3
    with pytest.raises(ImageShardError, match="finished 'sd' image set"):
        ImageShardWriter(tmp_path, vocabulary="x", classes=["cat"], source="sd")


def test_unfinished_directory_for_other_classes_is_refused(tmp_path):
    with pytest.raises(RuntimeError), _writer(tmp_path) as writer:
        _write(writer, range(2))
        raise RuntimeError
    with pytest.raises(ImageShardError, match="another class list"):
        ImageShardWriter(tmp_path, vocabulary="x", classes=["dog", "cat"], source="sd")


def test_bad_samples_are_refused(tmp_path):
    with _writer(tmp_path) as writer:
        with pytest.raises(ImageShardError, match="no dots"):
            writer.write("img.1", _jpeg(0), _meta(0))
        with pytest.raises(ImageShardError, match="lacks class_index"):
            writer.write("img-1", _jpeg(0), {"class_name": "cat", "source": "sd"})
        with pytest.raises(ImageShardError, match="class 1 here is 'dining table'"):
            writer.write("img-1", _jpeg(0), {**_meta(0), "class_index": 1})
    with pytest.raises(ImageShardError, match="not one of"):
        ImageShardWriter(tmp_path / "x", vocabulary="x", classes=CLASSES, source="dreams")


def test_corrupt_shard_is_reported_by_reader_and_writer(tmp_path):
    with _writer(tmp_path) as writer:
        _write(writer, range(2))
    shard = tmp_path / read_image_manifest(tmp_path).shards[0]["name"]
    data = bytearray(shard.read_bytes())
    position = data.index(b"img-000.jpg") + 512 + 200  # a byte inside the first JPEG
    data[position] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ImageShardError, match="does not match its sha256"):
        list(iter_images(tmp_path))
    with pytest.raises(ImageShardError, match="is corrupt"):
        _writer(tmp_path)


def test_flagged_images_are_skipped_unless_asked_for(tmp_path):
    with _writer(tmp_path) as writer:
        writer.write("ok", _jpeg(0), _meta(0))
        writer.write("nsfw", _jpeg(1), {**_meta(0), "flagged": True})
    manifest = read_image_manifest(tmp_path)
    assert manifest.flagged == 1 and manifest.per_class["cat"] == 1
    assert [k for k, _, _ in iter_images(tmp_path)] == ["ok"]
    assert [k for k, _, _ in iter_images(tmp_path, include_flagged=True)] == ["ok", "nsfw"]


def test_missing_manifest_says_what_to_do(tmp_path):
    with pytest.raises(ImageShardError, match="run the job that writes it again"):
        list(iter_images(tmp_path))


def test_to_rgb_handles_modes_and_exif_rotation():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    gray = Image.new("L", (4, 4), 77)
    assert to_rgb(gray).getpixel((0, 0)) == (77, 77, 77)
    deep = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert to_rgb(deep).getpixel((0, 0)) == (255, 255, 255)
    half = Image.fromarray(np.full((4, 4), 257 * 100, dtype=np.uint16))
    assert to_rgb(half).getpixel((0, 0)) == (100, 100, 100)  # scaled, not clipped
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    assert to_rgb(palette).getpixel((0, 0)) == (0, 255, 0)
    wide = Image.new("RGB", (30, 10), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    wide.save(buffer, format="JPEG", exif=exif.tobytes())
    assert to_rgb(Image.open(buffer)).size == (10, 30)


def test_contact_sheets_are_written_and_logged_to_an_active_wandb_run(tmp_path):
    import wandb

    images = tmp_path / "images"
    with _writer(images) as writer:
        _write(writer, range(5))
    with wandb.init(mode="offline", dir=str(tmp_path), project="usam-tests") as run:
        paths = write_contact_sheets(images, max_per_class=2, thumb=32)
        logged = set(run.summary.keys())
    assert [p.name for p in paths] == ["000-cat.png", "001-dining_table.png"]
    assert Image.open(paths[0]).size == (2 * 32, 32 + 14)  # two tiles under the caption
    assert {"contact_sheet/cat", "contact_sheet/dining table"} <= logged
