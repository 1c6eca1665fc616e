"""Image sources: key derivation, image-mode conversion, rejection of bad files, image sets."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from usam.data.sources import (
    FolderSource,
    ImageShardSource,
    RejectedImage,
    check_unique_keys,
    image_key,
    load_rgb,
)
from usam.formats.image_shards import ImageShardWriter, encode_jpeg
from usam.formats.storage import KEY_PATTERN

CLASSES = ("cat", "dog")


def _save(path: Path, image: Image.Image, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    return path


def _jpeg_bytes(size=(32, 24), colour=(200, 30, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def _palette_image(colour: tuple[int, int, int]) -> Image.Image:
    image = Image.new("P", (8, 6), 1)
    image.putpalette([0, 0, 0, *colour] + [0] * 762)
    return image


def test_image_key_keeps_valid_names_and_separates_lookalikes():
    assert image_key("2007_000032") == "2007_000032"
    keys = [image_key(n) for n in ("a.b.jpg", "a_b.jpg", "a/b.jpg", "a b.jpg", "é.jpg")]
    assert len(set(keys)) == len(keys)
    for key in keys:
        assert KEY_PATTERN.match(key)
    assert keys[0].startswith("a_b_jpg-")
    assert image_key("a.b.jpg") == keys[0]  # deterministic
    long = image_key("x" * 300 + ".png")
    assert len(long) < 100 and KEY_PATTERN.match(long)


def test_check_unique_keys_names_both_inputs():
    with pytest.raises(ValueError, match="'one.jpg' and 'two.jpg'"):
        check_unique_keys(["k", "k"], ["one.jpg", "two.jpg"], "somewhere")


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: Image.new("L", (8, 6), 77), (77, 77, 77)),
        (lambda: Image.new("1", (8, 6), 1), (255, 255, 255)),
        (lambda: Image.new("LA", (8, 6), (10, 0)), (255, 255, 255)),  # transparent -> white
        (lambda: Image.new("RGBA", (8, 6), (255, 0, 0, 255)), (255, 0, 0)),
        (lambda: Image.new("RGBA", (8, 6), (0, 0, 255, 0)), (255, 255, 255)),
        (lambda: _palette_image((1, 2, 3)), (1, 2, 3)),
    ],
    ids=["L", "1", "LA", "RGBA-opaque", "RGBA-clear", "P"],
)
def test_load_rgb_converts_png_modes(tmp_path, make, expected):
    path = _save(tmp_path / "x.png", make())
    image = load_rgb(path)
    assert image.mode == "RGB" and image.size == (8, 6)
    assert image.getpixel((3, 3)) == expected


def test_load_rgb_palette_with_transparency(tmp_path):
    palette_image = Image.new("P", (4, 4), 1)
    palette_image.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    palette_image.putpixel((0, 0), 0)
    path = _save(tmp_path / "p.png", palette_image, transparency=0)
    image = load_rgb(path)
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((2, 2)) == (0, 200, 0)


def test_load_rgb_sixteen_bit_keeps_range(tmp_path):
    array = np.array([[0, 32896, 65535]], dtype=np.uint16)
    path = _save(tmp_path / "deep.png", Image.fromarray(array))
    pixels = np.asarray(load_rgb(path))
    assert pixels[0, :, 0].tolist() == [0, 128, 255]
    assert (pixels[..., 0] == pixels[..., 2]).all()


def test_load_rgb_cmyk_jpeg(tmp_path):
    path = _save(tmp_path / "cmyk.jpg", Image.new("CMYK", (16, 16), (0, 255, 255, 0)), quality=95)
    red, green, blue = load_rgb(path).getpixel((8, 8))
    assert red > 230 and green < 25 and blue < 25


def test_load_rgb_applies_exif_rotation_unless_told_not_to(tmp_path):
    photo = Image.new("RGB", (40, 20), (0, 0, 255))
    photo.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = photo.getexif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    path = _save(tmp_path / "rotated.jpg", photo, exif=exif.tobytes(), quality=95)
    upright = load_rgb(path)
    assert upright.size == (20, 40)
    assert upright.getpixel((10, 5))[0] > 200 and upright.getpixel((10, 35))[2] > 200
    stored = load_rgb(path, upright=False)
    assert stored.size == (40, 20)
    assert stored.getpixel((5, 10))[0] > 200


BAD_FILES = {
    "empty.jpg": (b"", "empty file"),
    "truncated.jpg": (_jpeg_bytes((64, 64))[:300], "corrupt or truncated"),
    "noise.png": (bytes(range(256)) * 4, "not an image"),
    "notes.txt": (b"not a picture\n", "not an image"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_load_rgb_rejects_bad_files(tmp_path, name):
    data, reason = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(RejectedImage, match=reason) as caught:
        load_rgb(path)
    assert caught.value.path == str(path)


def test_load_rgb_rejects_missing_file(tmp_path):
    with pytest.raises(RejectedImage, match="cannot read the file"):
        load_rgb(tmp_path / "gone.jpg")


def test_load_rgb_rejects_png_with_broken_pixel_data(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)).save(
        buffer, format="PNG"
    )
    data = bytearray(buffer.getvalue())
    start = data.index(b"IDAT") + 8
    data[start : start + 40] = bytes(40)  # zero the middle of the compressed stream
    path = tmp_path / "broken.png"
    path.write_bytes(bytes(data))
    with pytest.raises(RejectedImage, match="corrupt or truncated"):
        load_rgb(path)


def _folder(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    _save(root / "b.jpg", Image.new("RGB", (20, 10), (9, 9, 9)))
    _save(root / "nested" / "deeper" / "a.png", Image.new("L", (5, 7), 3))
    _save(root / "a_png.png", Image.new("RGB", (4, 4)))
    (root / "nested" / "broken.jpg").write_bytes(_jpeg_bytes()[:200])
    (root / "zero.jpg").write_bytes(b"")
    (root / "readme.txt").write_text("hello")
    (root / ".DS_Store").write_bytes(b"\0\0")
    (root / ".cache").mkdir()
    _save(root / ".cache" / "thumb.jpg", Image.new("RGB", (4, 4)))
    return root


def test_folder_source_lists_recursively_and_rejects_bad_files(tmp_path):
    root = _folder(tmp_path)
    source = FolderSource(root, CLASSES)
    assert source.kind == "eval" and source.classes == CLASSES
    assert len(source) == 6  # hidden file and folder skipped
    images = list(source)
    names = [i.source["path"] for i in images]
    assert names == ["a_png.png", "b.jpg", "nested/deeper/a.png"]
    assert all(
        i.image.mode == "RGB" and i.labels is None and i.ground_truth is None for i in images
    )
    assert images[2].image.size == (5, 7)
    assert len({i.key for i in images}) == 3 and all(KEY_PATTERN.match(i.key) for i in images)
    rejected = {Path(p).name: reason for p, reason in source.rejected}
    assert set(rejected) == {"broken.jpg", "zero.jpg", "readme.txt"}
    assert "empty" in rejected["zero.jpg"]
    list(source)  # a second pass reports each rejection once, not twice
    assert len(source.rejected) == 3


def test_folder_source_random_access_matches_iteration(tmp_path):
    source = FolderSource(_folder(tmp_path), CLASSES)
    index = source.keys.index(image_key("nested/deeper/a.png"))
    assert source.load(index).source["path"] == "nested/deeper/a.png"
    with pytest.raises(RejectedImage):
        source.load(source.keys.index(image_key("zero.jpg")))


def test_folder_fingerprint_is_stable_and_tracks_inputs(tmp_path):
    root = _folder(tmp_path)
    first = FolderSource(root, CLASSES).fingerprint()
    assert FolderSource(root, CLASSES).fingerprint() == first
    assert FolderSource(root, ("cat",)).fingerprint() != first
    (root / "b.jpg").write_bytes(_jpeg_bytes((21, 10)))
    changed = FolderSource(root, CLASSES).fingerprint()
    assert changed != first
    _save(root / "c.jpg", Image.new("RGB", (4, 4)))
    assert FolderSource(root, CLASSES).fingerprint() != changed


def test_folder_source_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere is not an image file, a folder or a glob"):
        FolderSource(tmp_path / "nowhere", CLASSES)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty holds no files"):
        FolderSource(tmp_path / "empty", CLASSES)
    with pytest.raises(FileNotFoundError, match=r"pattern images=.*\*\.gif matches no file"):
        FolderSource(tmp_path / "*.gif", CLASSES)


def test_folder_source_takes_one_image_or_a_glob_pattern(tmp_path):
    root = _folder(tmp_path)
    single = FolderSource(root / "nested" / "deeper" / "a.png", CLASSES)
    assert [i.source["path"] for i in single] == [
        "a.png"
    ] and single.root == root / "nested" / "deeper"
    pattern = FolderSource(f"{root}/**/*.png", CLASSES)
    assert [i.source["path"] for i in pattern] == ["a_png.png", "nested/deeper/a.png"]
    assert pattern.root == root and not pattern.rejected


def _image_set(directory: Path, count: int = 5) -> list[tuple[str, bytes]]:
    written = []
    with ImageShardWriter(
        directory, vocabulary="custom", classes=CLASSES, source="folder", images_per_shard=2
    ) as writer:
        for i in range(count):
            index = i % 2
            jpeg = encode_jpeg(Image.new("RGB", (16 + i, 12), (40 * i, 100, 20)))
            meta = {"class_name": CLASSES[index], "class_index": index, "source": "folder"}
            if i == 3:
                meta["flagged"] = True
            key = f"folder-{i:03d}"
            writer.write(key, jpeg, {**meta, "path": f"{key}.jpg"})
            written.append((key, jpeg))
    return written


def test_image_shard_source_reads_labels_and_skips_flagged(tmp_path):
    written = _image_set(tmp_path / "set")
    source = ImageShardSource(tmp_path / "set")
    assert source.kind == "train" and source.classes == CLASSES
    assert source.keys == ("folder-000", "folder-001", "folder-002", "folder-004")
    late = source.load(3)  # random access into the last shard first
    assert late.key == "folder-004" and late.labels == [1, 0]
    assert late.image.size == (20, 12) and late.image.mode == "RGB"
    expected = Image.open(io.BytesIO(dict(written)["folder-004"])).convert("RGB")
    assert np.array_equal(np.asarray(late.image), np.asarray(expected))
    images = list(source)
    assert [i.labels for i in images] == [[1, 0], [0, 1], [1, 0], [1, 0]]
    assert images[1].source["class_name"] == "dog" and images[1].source["path"] == "folder-001.jpg"
    assert all(i.ground_truth is None for i in images) and source.rejected == []


def test_image_shard_source_fingerprint_follows_content(tmp_path):
    _image_set(tmp_path / "one")
    _image_set(tmp_path / "two")
    _image_set(tmp_path / "three", count=4)
    one = ImageShardSource(tmp_path / "one").fingerprint()
    assert ImageShardSource(tmp_path / "two").fingerprint() == one  # same images, other place
    assert ImageShardSource(tmp_path / "three").fingerprint() != one


def test_image_shard_source_detects_tampered_image(tmp_path):
    _image_set(tmp_path / "set", count=2)
    shard = tmp_path / "set" / "images-000000.tar"
    data = bytearray(shard.read_bytes())
    marker = data.index(b"\xff\xd8") + 400  # inside the first JPEG
    data[marker] ^= 0xFF
    shard.write_bytes(bytes(data))
    os.utime(shard)
    source = ImageShardSource(tmp_path / "set")
    with pytest.raises(ValueError, match="sha256"):
        source.load(0)


def test_a_file_name_that_is_not_utf8_gets_a_safe_key(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    latin1 = os.fsdecode(b"caf\xe9.png")  # a name written on a Latin-1 system
    _save(root / latin1, Image.new("RGB", (6, 4)))
    _save(root / "plain.png", Image.new("RGB", (4, 4)))
    source = FolderSource(root, CLASSES)
    assert len(source) == 2 and all(KEY_PATTERN.match(key) for key in source.keys)
    loaded = source.load(source.keys.index(image_key(latin1)))
    assert loaded.image.size == (6, 4) and loaded.source["path"] == latin1
    assert image_key(latin1) != image_key(os.fsdecode(b"caf\xe8.png"))
    assert len(source.fingerprint()) == 64
