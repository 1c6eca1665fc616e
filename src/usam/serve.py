"""A Label Studio ML backend: ``python -m usam.serve ckpt=HEAD.ckpt out=DIR``.

What it does lives in :mod:`usam.commands.serve` and :mod:`usam.serving`; ``--help`` lists
its options.
"""

from usam.cli import hydra_command

main = hydra_command("serve", "usam.commands.serve")

if __name__ == "__main__":
    main()
