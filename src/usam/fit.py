"""Train the U-SAM head: ``python -m usam.fit experiment=voc_sd [stage=teacher|student|both]``.

What it does lives in :mod:`usam.commands.fit`; ``--help`` lists its options.
"""

from usam.cli import hydra_command

main = hydra_command("fit", "usam.commands.fit")

if __name__ == "__main__":
    main()
