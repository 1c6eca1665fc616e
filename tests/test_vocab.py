from __future__ import annotations

import json

import pytest

from usam.core.vocabulary import VocabularyError, load_vocabulary


def test_packaged_vocabularies_have_standard_sizes_and_order():
    voc = load_vocabulary("voc20")
    coco = load_vocabulary("coco80")
    assert (
        voc.num_classes == 20 and voc.classes[0] == "aeroplane" and voc.classes[-1] == "tv monitor"
    )
    assert (
        coco.num_classes == 80 and coco.classes[0] == "person" and coco.classes[-1] == "toothbrush"
    )
    assert coco.classes.index("dining table") == 60


def test_superclasses_cover_every_voc_class_exactly_once():
    superclasses = load_vocabulary("voc_superclasses")
    assert superclasses.classes == (
        "animals",
        "furniture",
        "household items",
        "person",
        "transportation",
    )
    mapping = superclasses.parent_label_map()
    assert sorted(mapping) == list(range(20))
    voc = load_vocabulary("voc20")
    assert mapping[voc.classes.index("cat")] == superclasses.classes.index("animals")
    assert mapping[voc.classes.index("motorbike")] == superclasses.classes.index("transportation")


def test_inline_names_are_normalised():
    vocabulary = load_vocabulary(["  Potted   Plant ", "DOG"])
    assert vocabulary.classes == ("potted plant", "dog")


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["cat", " Cat "], "appears twice"),
        (["cat", "  "], "is empty"),
        ([], "class list is empty"),
    ],
)
def test_bad_class_lists_fail_with_a_clear_message(names, message):
    with pytest.raises(VocabularyError, match=message):
        load_vocabulary(names)


def test_unknown_name_lists_the_choices():
    with pytest.raises(VocabularyError, match="voc20, coco80, voc_superclasses"):
        load_vocabulary("voc21")


def test_json_file_vocabulary(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"name": "mine", "classes": ["Red Car", "bus"]}))
    vocabulary = load_vocabulary(str(path))
    assert vocabulary.name == "mine" and vocabulary.classes == ("red car", "bus")


def test_json_file_holding_a_plain_list_is_named_after_the_file(tmp_path):
    path = tmp_path / "pets.json"
    path.write_text(json.dumps(["Cat", " dog "]))
    vocabulary = load_vocabulary(str(path))
    assert vocabulary.name == "pets" and vocabulary.classes == ("cat", "dog")


@pytest.mark.parametrize("text", ['{"names": ["cat"]}', '"cat"', '{"classes": "cat"}', "[cat"])
def test_a_json_file_of_another_shape_names_both_shapes(tmp_path, text):
    path = tmp_path / "bad.json"
    path.write_text(text)
    shapes = r'a list of class names, or \{"classes": \[\.\.\.\]\}'
    with pytest.raises(VocabularyError, match=shapes):
        load_vocabulary(str(path))
