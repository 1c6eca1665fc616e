"""Training images from class names: ``python -m usam.generate data.classes=voc20``.

What it does lives in :mod:`usam.commands.generate`; ``--help`` lists its options.
"""

from usam.cli import hydra_command

main = hydra_command("generate", "usam.commands.generate")

if __name__ == "__main__":
    main()
