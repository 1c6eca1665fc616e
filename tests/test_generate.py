"""Stable Diffusion generation on a tiny random pipeline saved to disk: the real code path."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import usam.commands.generate as generate_command
import usam.images.stable_diffusion as generate
from usam.core.vocabulary import load_vocabulary
from usam.formats.image_shards import iter_images, read_image_manifest
from usam.images.stable_diffusion import (
    GenerateSettings,
    GenerationError,
    generate_images,
    load_pipeline,
    plan_image,
    render,
)
from usam.testing.tiny_diffusion import save_tiny_pipeline

from helpers.commands import compose_config


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return str(save_tiny_pipeline(tmp_path_factory.mktemp("sd") / "tiny"))


def _settings(model: str, **changes) -> GenerateSettings:
    base = dict(
        model=model,
        per_class=4,
        batch_size=2,
        steps=2,
        height=32,
        width=32,
        safety_checker=False,
        device="cpu",
        images_per_shard=5,
        contact_sheet_max=4,
    )
    return GenerateSettings(**{**base, **changes})


def test_plans_depend_on_class_and_index_alone():
    settings = GenerateSettings(templates=["a photo of a {c}", "a {c} outdoors"])
    voc = load_vocabulary("voc20")
    mine = load_vocabulary(["dog", "cat"])
    cat_voc = plan_image(voc, voc.classes.index("cat"), 5, settings)
    cat_mine = plan_image(mine, 1, 5, settings)
    assert cat_voc.seed == cat_mine.seed and cat_voc.prompt == cat_mine.prompt
    assert plan_image(mine, 1, 6, settings).seed != cat_mine.seed
    assert plan_image(mine, 0, 5, settings).seed != cat_mine.seed
    assert plan_image(mine, 1, 5, GenerateSettings(seed=1)).seed != cat_mine.seed
    prompts = [plan_image(mine, 1, i, settings).prompt for i in range(4)]
    assert prompts == ["a photo of a cat", "a cat outdoors"] * 2
    shuffled = GenerateSettings(templates=settings.templates, template_order="random")
    drawn = [plan_image(mine, 1, i, shuffled).prompt for i in range(40)]
    assert drawn == [plan_image(mine, 1, i, shuffled).prompt for i in range(40)]
    assert set(drawn) == {"a photo of a cat", "a cat outdoors"} and drawn[:4] != prompts


def test_superclass_prompts_name_the_superclass_unless_members_are_asked_for():
    vocab = load_vocabulary("voc_superclasses")
    paper = GenerateSettings(class_templates={"Animals": ["a {c} in the wild"]})
    composed = GenerateSettings.from_config(compose_config("generate", []).generate)
    assert composed.superclass_prompts == paper.superclass_prompts == "class_name"  # the paper
    animals = [plan_image(vocab, 0, i, paper) for i in range(3)]
    assert [p.prompt for p in animals] == ["a animals in the wild"] * 3
    assert all(p.member is None and p.class_name == "animals" for p in animals)
    assert plan_image(vocab, 2, 0, paper).prompt == "a photo of a household items"
    settings = GenerateSettings(
        templates=["a photo of a {c}"],
        class_templates={"Animals": ["a {c} in the wild"]},
        superclass_prompts="members",
    )
    animals = [plan_image(vocab, 0, i, settings) for i in range(7)]
    assert [p.member for p in animals] == [*vocab.members["animals"], "bird"]
    assert animals[1].prompt == "a cat in the wild" and animals[1].class_name == "animals"
    assert plan_image(vocab, 1, 0, settings).prompt == "a photo of a chair"
    assert plan_image(load_vocabulary(["animals"]), 0, 0, settings).member is None
    with pytest.raises(GenerationError, match="not classes of 'voc_superclasses'"):
        plan_image(vocab, 0, 0, GenerateSettings(class_templates={"cats": ["a {c}"]}))


def test_settings_are_checked():
    with pytest.raises(GenerationError, match="has no '\\{c\\}'"):
        GenerateSettings.from_config({"templates": ["a photo"]})
    with pytest.raises(GenerationError, match="multiple of 8"):
        GenerateSettings.from_config({"height": 30})
    with pytest.raises(GenerationError, match="superclass_prompts is 'parts'; use one of"):
        GenerateSettings.from_config({"superclass_prompts": "parts"})
    with pytest.raises(GenerationError, match="unknown key generate.prompts; valid keys: model"):
        GenerateSettings.from_config({"prompts": ["a {c}"]})


def test_generation_resumes_after_a_crash_without_duplicates(tmp_path, tiny_model, monkeypatch):
    vocab = load_vocabulary("voc_superclasses")
    out = tmp_path / "images"
    settings = _settings(tiny_model, per_class=3)
    real_render = generate.render
    calls = []
    crash = [True]

    def crash_on_third_batch(pipe, plans, settings):
        calls.append([p.key for p in plans])
        if crash[0] and len(calls) == 3:
            raise KeyboardInterrupt
        return real_render(pipe, plans, settings)

    monkeypatch.setattr(generate, "render", crash_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        generate_images(vocab, settings, out, progress=False)
    assert not (out / "manifest.json").exists()
    before = set(calls[0] + calls[1])

    crash[0] = False
    calls.clear()
    manifest = generate_images(vocab, settings, out, progress=False)
    again = {key for batch in calls for key in batch}
    assert not again & before  # nothing generated twice
    assert len(before) == 3 and len(again) == 12  # all but the two batches that finished
    keys = [key for key, _, _ in iter_images(out)]
    assert len(keys) == len(set(keys)) == 15
    assert manifest.per_class == dict.fromkeys(vocab.classes, 3)
    assert manifest.random_weights and manifest.source == "sd"
    metas = {key: meta for key, _, meta in iter_images(out)}
    animals = [metas[f"c000-animals-{i:06d}"] for i in range(3)]
    assert [m["member"] for m in animals] == [None] * 3
    assert [m["prompt"] for m in animals] == ["a photo of a animals"] * 3
    assert all(m["random_weights"] and m["class_name"] == "animals" for m in animals)
    sheets = sorted(p.name for p in (out / "contact_sheets").glob("*.png"))
    assert sheets == [
        "000-animals.png",
        "001-furniture.png",
        "002-household_items.png",
        "003-person.png",
        "004-transportation.png",
    ]
    assert Image.open(out / "contact_sheets" / sheets[0]).size[0] >= 2 * 128

    def no_loading(settings):
        raise AssertionError("a finished image set needs no pipeline")

    monkeypatch.setattr(generate, "load_pipeline", no_loading)
    calls.clear()
    assert generate_images(vocab, settings, out, progress=False).num_images == 15
    assert calls == []


def test_any_image_can_be_reproduced_alone(tmp_path, tiny_model):
    vocab = load_vocabulary(["cat", "dog"])
    settings = _settings(tiny_model, per_class=3, batch_size=3)
    generate_images(vocab, settings, tmp_path, progress=False)
    stored = {key: np.asarray(image, dtype=int) for key, image, _ in iter_images(tmp_path)}
    plan = plan_image(vocab, 1, 2, settings)
    (image,), (flagged,) = render(load_pipeline(settings), [plan], settings)
    assert not flagged
    alone = np.asarray(Image.open(_as_jpeg(image)), dtype=int)
    assert np.abs(alone - stored[plan.key]).mean() < 2.0
    assert np.abs(stored["c001-dog-000001"] - stored[plan.key]).mean() > 10.0


def _as_jpeg(image: Image.Image) -> io.BytesIO:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer


def test_changed_recipe_is_refused_on_resume(tmp_path, tiny_model):
    vocab = load_vocabulary(["cat"])
    generate_images(vocab, _settings(tiny_model, per_class=2), tmp_path, progress=False)
    changed = _settings(tiny_model, per_class=2, templates=["a {c} on grass"])
    with pytest.raises(GenerationError, match="prompt='a photo of a cat'.*generate.out_dir"):
        generate_images(vocab, changed, tmp_path, progress=False)


def test_safety_flagged_images_are_kept_marked_skipped_and_replaced(
    tmp_path, tiny_model, monkeypatch
):
    """The paper's "200 single object images per class": every class gets per_class usable
    images; a flagged one stays in the set, marked, and the class's next plan replaces it."""
    real_render = generate.render
    rendered = []

    def flag_some(pipe, plans, settings):
        rendered.extend(p.key for p in plans)
        images, _ = real_render(pipe, plans, settings)
        return images, [p.class_name == "cat" and p.index in (0, 3) for p in plans]

    monkeypatch.setattr(generate, "render", flag_some)
    vocab = load_vocabulary(["cat", "dog"])
    manifest = generate_images(vocab, _settings(tiny_model, per_class=3), tmp_path, progress=False)
    assert manifest.flagged == 2 and manifest.per_class == {"cat": 3, "dog": 3}
    cats = [k for k, _, _ in iter_images(tmp_path) if k.startswith("c000")]
    assert cats == ["c000-cat-000001", "c000-cat-000002", "c000-cat-000004"]
    assert len(rendered) == len(set(rendered)) == 8
    rendered.clear()
    generate_images(vocab, _settings(tiny_model, per_class=3), tmp_path, progress=False)
    assert rendered == []  # complete, flags included: nothing to redo


def test_a_class_the_safety_checker_keeps_flagging_stops_with_its_name(
    tmp_path, tiny_model, monkeypatch
):
    real_render = generate.render

    def flag_dogs(pipe, plans, settings):
        images, _ = real_render(pipe, plans, settings)
        return images, [p.class_name == "dog" for p in plans]

    monkeypatch.setattr(generate, "render", flag_dogs)
    settings = _settings(tiny_model, per_class=2, max_flagged_per_class=3)
    with pytest.raises(GenerationError, match=r"flagged 4 images of class 'dog'.*max_flagged"):
        generate_images(load_vocabulary(["cat", "dog"]), settings, tmp_path, progress=False)


def test_missing_weights_say_how_to_point_at_a_local_directory(tmp_path):
    with pytest.raises(GenerationError) as error:
        load_pipeline(GenerateSettings(model="usam-tests/no-such-pipeline", device="cpu"))
    message = str(error.value)
    assert "'usam-tests/no-such-pipeline'" in message and "generate.model=/path/to/dir" in message
    with pytest.raises(GenerationError, match="no model_index.json"):
        load_pipeline(GenerateSettings(model=str(tmp_path / "nothing"), device="cpu"))


def test_config_composes_and_runs(tmp_path, tiny_model):
    cfg = compose_config(
        "generate",
        [
            "generate=tiny",
            f"paths.root_dir={tmp_path}",
            "data.classes=[Cat, dog]",
            f"generate.model={tiny_model}",
            "generate.per_class=2",
        ],
    )
    out = generate_command.run(cfg)
    assert out.parent == tmp_path / "data" / "images" and out.name.endswith("_sd_tiny")
    manifest = read_image_manifest(out)
    assert manifest.classes == ["cat", "dog"] and manifest.num_images == 4


def test_command_line_builds_the_tiny_pipeline_and_generates(tmp_path):
    env = {**os.environ, "USAM_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "usam.generate",
            "generate=tiny",
            "data.classes=voc_superclasses",
            "generate.per_class=1",
            f"paths.root_dir={tmp_path}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "data" / "images" / "voc_superclasses_sd_tiny"
    assert Path(result.stdout.strip().splitlines()[-1]) == out
    assert read_image_manifest(out).num_images == 5
    assert (tmp_path / "cache" / "tiny_stable_diffusion" / "model_index.json").is_file()
