"""The one table of what the tests change to run the READMEs' commands here (no weights,
no network, no GPU), each change with the reason for it: ``tests/test_readme_commands.py``
runs every command with these changes and no others, and fails on a command that is
neither run nor listed in ``NOT_RUN``.

``{name}`` in a replacement stands for an input the test makes (``voc``, ``coco``,
``photos``, ``class_tree``, ``voc_urls``, ``coco_urls``, ``server``, ``home``) or, in
``EXPECT``, for the value the run's command line gives that key.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Swap:
    """A token (full match) replaced by ``tokens``, ``{name}`` filled from the inputs."""

    token: str
    tokens: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class Added:
    """Overrides appended to the commands ``pattern`` finds, unless they set the key."""

    pattern: str
    overrides: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class Setup:
    """An input the test makes, put at ``at`` (in the command's folder) before it runs."""

    pattern: str
    input: str
    at: str
    reason: str


@dataclass(frozen=True)
class Continues:
    """Commands ``pattern`` finds run in a copy of the folder of the nearest earlier
    command of their README that ``producer`` finds."""

    pattern: str
    producer: str
    reason: str


@dataclass(frozen=True)
class Produced:
    """A placeholder (group 1 of ``token``) filled from the run of the README command
    ``producer`` finds: ``path`` the file of that run the placeholder names (digits and
    ``...`` read as any), ``teacher`` / ``student`` the path fit printed after
    ``<stage> checkpoint: ``."""

    token: str
    producer: str
    source: str
    reason: str


@dataclass(frozen=True)
class Expect:
    """What the README says commands ``pattern`` finds leave: files (globs in the command's
    folder), printed lines (regexes), and paths that must not exist. ``{name}`` is the
    value the run's command line gives ``name``."""

    pattern: str
    reason: str
    files: tuple[str, ...] = ()
    printed: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()


NOT_RUN = {
    r"^make ": "sets up .venv, then the demo (test_fit runs it shrunk) or this suite",
    r"^(\w+=\S+ )*pip install ": "installs into the environment under test, from the index",
    r"^\.venv/bin/pytest ": "this suite's slow part, these commands included",
    r"^export ": "sets the paths the commands read: VARIABLES gives each a stand-in",
    r"^(\w+=\S+ )*wandb (sweep|agent) ": "W&B online; usam.sweep runs the same grid offline",
    r"label-studio start": "a Label Studio server, in an environment of its own",
    r"cvat-cli ": "a CVAT server",
    r"trainer\.num_nodes=": "several machines",
    r"^python -m usam\.fit stage=finetune ": (
        "a review export of the user's photos: tests/test_finetune.py runs the stage end to end "
        "on a Label Studio export of a folder, with a tiny SAM"
    ),
    r"^python -m usam\.serve ": (
        "a server that runs until stopped: tests/test_serve.py and, with Label Studio, "
        "tests/test_label_studio_loop.py start it on a free loopback port"
    ),
}

VARIABLES = {  # $NAME in a command -> its stand-in ("" where the token holding it is dropped)
    "VOC": ("{voc}", "a VOC2012 folder of two annotated images made by the test"),
    "COCO": ("{coco}", "a COCO folder (val2017/, annotations/) of two images made by the test"),
    "SAM_CKPT": ("", "only in sam.checkpoint=, which SWAPS drops"),
    "SAM2_CKPT": ("", "only in sam.checkpoint=, which SWAPS drops"),
    "SAM3_DIR": ("", "only in baseline.sam3.checkpoint=, which SWAPS replaces"),
    "VOC_URLS": ("{voc_urls}", "a URL list of the VOC classes' images on a loopback server"),
    "COCO_URLS": ("{coco_urls}", "a URL list of the COCO classes' images on a loopback server"),
    "HOME": ("{home}", "the test session's home folder (photos/ inside): nothing in the user's"),
}

SWAPS = (
    Swap(r"sam=vit_[hlbt]", ("sam=tiny",), "SAM's weights (0.04-2.4 GB): a tiny random SAM"),
    Swap(r"sam=sam2\.1_hiera_\S+", ("sam=sam2.1_tiny",), "SAM 2.1's weights: its tiny random one"),
    Swap(r"sam=hq_vit_\S+", ("sam=hq_tiny",), "HQ-SAM's weights: its tiny random one"),
    Swap(r"sam\.checkpoint=\S*", (), "the tiny SAMs are built in code and read no file"),
    Swap(
        r"baseline\.sam3\.checkpoint=\S*",
        ("baseline.sam3.model=tiny",),
        "SAM 3's weights are gated: a tiny random SAM 3",
    ),
    Swap(r"generate\.per_class=\d+", ("generate.per_class=2",), "2 images per class, not 200"),
    Swap(r"ingest\.per_class=\d+", ("ingest.per_class=2",), "2 images per class, not 200"),
    Swap(r"trainer\.devices=\d+", ("trainer.devices=2",), "two CPU processes stand for the GPUs"),
    Swap(
        r"extract\.trainer\.devices=\d+",
        ("extract.trainer.devices=2", "extract.trainer.accelerator=cpu"),
        "two CPU processes stand for the GPUs",
    ),
    Swap(
        r"eval_data\.source\.root=/data/VOCdevkit/VOC2012",
        ("eval_data.source.root={voc}",),
        "the test's VOC2012 folder",
    ),
    Swap(r"ingest\.root=DIR", ("ingest.root={class_tree}",), "a <class>/*.jpg tree of the test's"),
)

FIT = r"^python -m usam\.(fit|sweep) "
ADDED = (
    Added(FIT, ("sam=tiny",), "the experiments' vit_h needs its 2.4 GB of weights"),
    Added(
        FIT, ("generate=tiny", "generate.per_class=2"), "a tiny random Stable Diffusion, 2 a class"
    ),
    Added(FIT, ("trainer.max_epochs=1", "trainer.accelerator=cpu"), "one epoch, no GPU"),
    Added(FIT, ("data.num_workers=0",), "the suite shares two cores: no loader processes"),
    Added(
        r"^python -m usam\.(fit|sweep|extract|eval) (?!.* ckpt=)(?!.*baseline=sam3)",
        ("amg.points_per_side=4",),
        "16 masks per image instead of 1,024 (eval and annotate reuse what the head records)",
    ),
    Added(
        r"^python -m usam\.(fit|sweep|extract|eval|annotate) ",
        ("extract.trainer.accelerator=cpu", "extract.num_workers=0"),
        "SAM on the CPU, in the command's process",
    ),
    Added(r"^python -m usam\.(eval|annotate) ", ("device=cpu",), "no GPU"),
    Added(r"trainer=ddp", ("data.batch_size=4",), "a batch that each rank's few images fill"),
    Added(r"^python -m usam\.generate ", ("generate=tiny",), "SD v1-4 is 5 GB of weights"),
    Added(
        r"^python -m usam\.extract ",
        ("data.source=sd_tiny",),
        "the set generate=tiny writes (the README: generate=tiny writes sd_tiny)",
    ),
    Added(
        r"baseline=sam_clip",
        ("baseline.clip.pretrained=null",),
        "CLIP's openai weights are a download: a random CLIP",
    ),
    Added(r"baseline=sam3", ("baseline.sam3.model=tiny",), "SAM 3's weights are gated"),
    Added(
        r"^python -m usam\.ingest ",
        ("ingest.allow_private_addresses=true", "ingest.politeness_delay=0"),
        "the stand-in servers are on loopback, which ingest refuses unless told",
    ),
    Added(
        r"ingest=openverse",
        ("ingest.api_url={server}/openverse/images/", "ingest.search_delay=0"),
        "Openverse's API answered by the loopback server, in its documented shape",
    ),
    Added(
        r"ingest=wikimedia",
        ("ingest.api_url={server}/w/api.php", "ingest.search_delay=0"),
        "Wikimedia Commons' API answered by the loopback server, in its documented shape",
    ),
)

SETUP = (
    Setup(
        r"eval_data=voc_val(?!.*eval_data\.source\.root)|^python -m usam\.sweep ",
        "voc",
        "data/VOCdevkit/VOC2012",
        "voc_val's default root (the sweep files' command names eval_data=voc_val too)",
    ),
    Setup(r"images=my_photos", "photos", "my_photos", "the user's photos: two made by the test"),
    Setup(r"images=\$HOME/photos", "photos", "{home}/photos", "the user's photos, in $HOME"),
    Setup(r"ingest\.urls=urls\.csv", "voc_urls", "urls.csv", "the user's URL list"),
)

CONTINUES = (
    Continues(
        r"^python -m usam\.extract ",
        r"^python -m usam\.generate data\.classes=voc20 ",
        "extract reads the image set generate wrote",
    ),
    Continues(
        r"^python -m usam\.fit experiment=\w+_wc ",
        r"^python -m usam\.ingest ",
        "the *_wc experiments train on the images ingest stored",
    ),
)

VOC_FIT = r"^python -m usam\.fit experiment=voc_sd$"
STUDENT_OF = r"^python -m usam\.fit experiment={} sam\.checkpoint=\S+ callbacks="
PRODUCED = (
    Produced(
        r"(?:teacher_)?ckpt=((?:outputs/fit/|\.\.\./)\S+)",
        VOC_FIT,
        "path",
        "the example run folder: that of the README's first fit command",
    ),
    Produced(r"ckpt=(\.\.\.)", VOC_FIT, "student", "any head: the first fit command's student"),
    Produced(r"ckpt=(\$VOC_STUDENT)", STUDENT_OF.format("voc_sd"), "student", "as the README says"),
    Produced(
        r"ckpt=(\$COCO_STUDENT)", STUDENT_OF.format("coco_sd"), "student", "as the README says"
    ),
    Produced(
        r"ckpt=(\$SUPERCLASS_STUDENT)",
        STUDENT_OF.format("voc_superclasses"),
        "student",
        "as the README says",
    ),
    Produced(
        r"ckpt=(\$VOC_SAM2_STUDENT)",
        r"^python -m usam\.fit experiment=voc_sd sam=sam2\.1",
        "student",
        "as the README says",
    ),
)

WRITTEN_AS = (  # the method table's paths as the runs here write them: (regex, as, why)
    (r"_sd(?=[/-])", "_sd_tiny", "generate=tiny writes its images apart, as <vocabulary>_sd_tiny"),
    (r"-vit_h-", "-tiny-", "a shard set is named after the SAM that made it"),
)

VARIANTS = {  # commands a pattern finds run a second time with these overrides
    r"trainer=ddp": (("logger=csv",), "DDP with the CSV logger as well as the default W&B one"),
}

FAST = {  # the default suite's share; every other command is marked slow
    r"^usam --version$": "the console script",
    VOC_FIT: "the fit run the student, annotate and eval commands read",
    r"^python -m usam\.fit experiment=voc_sd --cfg job$": "the composed config",
    r"^python -m usam\.fit experiment=voc_sd trainer=ddp trainer\.devices=\d+$": "DDP, W&B logging",
    r"^python -m usam\.fit experiment=voc_sd stage=student ": "a stage from another run's head",
    r"^python -m usam\.annotate images=my_photos ": "labelling the user's photos",
    r"^python -m usam\.eval ckpt=\.\.\. ": "scoring a head",
    r"^python -m usam\.generate ": "images from class names",
    r"^python -m usam\.ingest data\.classes=voc20 (ingest\.urls=|ingest=folder)": "a list, a tree",
}

RUN = r"outputs/fit/*-{sam}/*"
EVAL_RUN = "outputs/eval/*/*"
NOT_CFG = r"(?!.*--cfg)"
EXPECT = (
    Expect(r"^usam --version$", "usam --version", printed=(r"^usam \d+\.\d+\.\d+$",)),
    Expect(
        r"--cfg job$",
        "print the composed config",
        printed=(r"^sam:$", r"^  model_type: {sam}$", r"^stage: "),
        absent=("outputs",),
    ),
    Expect(
        rf"^python -m usam\.fit {NOT_CFG}",
        "config.yaml ... under outputs/fit/<data>-<sam>/<time>/; last lines: <stage> checkpoint:",
        files=(f"{RUN}/config.yaml",),
        printed=(r"^usam\.fit finished: ", r"^(teacher|student) checkpoint: /"),
    ),
    Expect(
        rf"^python -m usam\.fit {NOT_CFG}(?!.*stage=student)",
        "checkpoints/{teacher,student}/",
        files=(f"{RUN}/checkpoints/teacher/*.ckpt",),
    ),
    Expect(
        rf"^python -m usam\.fit {NOT_CFG}(?!.*stage=teacher)",
        "checkpoints/{teacher,student}/",
        files=(f"{RUN}/checkpoints/student/*.ckpt",),
    ),
    Expect(
        rf"^python -m usam\.fit {NOT_CFG}(?!.*logger=)",
        "W&B is offline by default: wandb/",
        files=(f"{RUN}/wandb/offline-run-*",),
    ),
    Expect(r"^python -m usam\.fit .*logger=csv", "wandb/ (or csv/)", files=(f"{RUN}/csv/*",)),
    Expect(
        r"^python -m usam\.fit .*callbacks=\[default,eval\]",
        "eval/ ... written under eval/<stage>/ in the run directory",
        files=(f"{RUN}/eval/*/test-*/metrics.json",),
    ),
    Expect(
        rf"^python -m usam\.(fit|extract|eval|annotate) {NOT_CFG}",
        "every output made with sam=tiny is marked random-weight in ... its console",
        printed=(r"RANDOM WEIGHTS",),
    ),
    Expect(
        r"^python -m usam\.sweep ",
        "the same grid as a Hydra multirun",
        files=("outputs/fit/multiruns/*/0/checkpoints/teacher/*.ckpt",),
    ),
    Expect(
        r"^python -m usam\.extract ",
        "extraction handles every image ... into {train,val}",
        printed=(r"^train: \d+ images", r"^val: \d+ images"),
    ),
    Expect(
        r"^python -m usam\.eval (?!.*baseline=)(?!.* ckpt=)",
        "the evaluation shard set",
        files=("data/shards/eval-{eval_data}-{sam}-*/eval/manifest.json",),
    ),
    Expect(
        r"^python -m usam\.eval (?=.* (ckpt|baseline)=)",
        "usam.eval writes metrics.json, per_class.csv, sweep.csv, sweep.png and overlays",
        files=tuple(
            f"{EVAL_RUN}/{name}"
            for name in ("metrics.json", "per_class.csv", "sweep.csv", "sweep.png", "overlays/*")
        ),
    ),
    Expect(
        r"^python -m usam\.eval (?!.*baseline=).* ckpt=",
        "under outputs/eval/<eval_data>-vit_h/<time>/",
        files=("outputs/eval/{eval_data}-{sam}/*/metrics.json",),
    ),
    Expect(
        r"baseline=sam3",
        "its detections stay in sam3_detections/ in the run folder",
        files=(f"{EVAL_RUN}/sam3_detections/*",),
    ),
    Expect(
        r"^python -m usam\.annotate ",
        "semantic/<path>.png, legend.png, overlays/<path>.jpg, review.csv; prints the settings",
        files=tuple(
            "{out}/" + name
            for name in ("semantic/*.png", "legend.png", "overlays/*.jpg", "review.csv")
        ),
        printed=(r"^mask settings ", r"least certain first"),
    ),
    Expect(
        r"^python -m usam\.annotate (?!.*export=)|export=\[[^\]]*coco",
        "export= ... default [coco]: coco is annotations.json",
        files=("{out}/annotations.json",),
    ),
    Expect(
        r"export=\[[^\]]*label_studio",
        "label_studio/tasks.json and config.xml",
        files=("{out}/label_studio/tasks.json", "{out}/label_studio/config.xml"),
    ),
    Expect(
        r"export=\[[^\]]*cvat",
        "cvat/annotations.xml, cvat/frames.txt, cvat/labels.json",
        files=tuple(f"{{out}}/cvat/{n}" for n in ("annotations.xml", "frames.txt", "labels.json")),
    ),
    Expect(
        r"^python -m usam\.ingest .*ingest=(openverse|wikimedia)",
        "data/images/<vocabulary>_web/ ... with ATTRIBUTION.csv, failed.jsonl and contact_sheets/",
        files=tuple(
            f"data/images/*_web/{n}"
            for n in ("ATTRIBUTION.csv", "failed.jsonl", "contact_sheets/*")
        ),
    ),
)
