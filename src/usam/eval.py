"""Score a trained head or a baseline: ``python -m usam.eval ckpt=<head.ckpt> eval_data=voc_val``.

What it does lives in :mod:`usam.commands.eval`; ``--help`` lists its options.
"""

from usam.cli import hydra_command

main = hydra_command("eval", "usam.commands.eval")

if __name__ == "__main__":
    main()
