"""``usam`` / ``python -m usam``: the version, and the commands with what each one does."""

from __future__ import annotations

import sys

from usam import __version__

COMMANDS = {
    "generate": "training images from class names with Stable Diffusion",
    "ingest": "training images from an image search by class name, a URL list or a folder",
    "extract": "SAM embedding shards of an image set",
    "fit": "train the teacher and student heads, or fine-tune one on reviewed annotations",
    "eval": "score a head, or the SAM+CLIP baseline, on an annotated dataset",
    "annotate": "label your own images with a trained head",
    "serve": "a Label Studio ML backend: predictions, and fine-tunes on the annotations submitted",
    "sweep": "run a W&B sweep file as a Hydra multirun",
}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--version"]:
        print(f"usam {__version__}")
        return 0
    width = max(map(len, COMMANDS))
    lines = [f"usam {__version__}: U-SAM on Lightning and Hydra. Commands:"]
    lines += [f"  usam-{name:<{width}}  {what}" for name, what in COMMANDS.items()]
    lines.append("Each is also `python -m usam.<command>`; `--help` on one lists its options.")
    print("\n".join(lines))
    return 0 if not args or args[0] in ("-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())
