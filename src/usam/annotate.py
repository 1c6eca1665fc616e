"""Label your own images: ``python -m usam.annotate images=DIR ckpt=HEAD.ckpt out=DIR``.

What it does lives in :mod:`usam.commands.annotate`; ``--help`` lists its options.
"""

from usam.cli import hydra_command

main = hydra_command("annotate", "usam.commands.annotate")

if __name__ == "__main__":
    main()
