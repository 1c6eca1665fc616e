"""SAM embedding shards of an image set: ``python -m usam.extract data=voc sam=vit_b``.

What it does lives in :mod:`usam.commands.extract`; ``--help`` lists its options.
"""

from usam.cli import hydra_command

main = hydra_command("extract", "usam.commands.extract")

if __name__ == "__main__":
    main()
