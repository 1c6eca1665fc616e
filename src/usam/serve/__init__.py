"""A Label Studio ML backend: ``python -m usam.serve ckpt=HEAD.ckpt out=DIR``.

What it does lives in :mod:`usam.commands.serve` (the command), :mod:`usam.serve.app`
(the HTTP routes and server) and :mod:`usam.serve.backend` (predictions, received
annotations, fine-tunes); ``--help`` lists its options.
"""

from usam.cli import hydra_command

main = hydra_command("serve", "usam.commands.serve")
