"""Training images from an image search, a URL list or a folder: ``python -m usam.ingest``.

What it does lives in :mod:`usam.commands.ingest`; ``--help`` lists its options.
"""

from usam.cli import hydra_command

main = hydra_command("ingest", "usam.commands.ingest")

if __name__ == "__main__":
    main()
