"""The Label Studio ML backend that ``python -m usam.serve`` runs: :mod:`usam.serving.app`
(the HTTP routes and the server), :mod:`usam.serving.backend` (predictions, received
annotations, fine-tunes) and what they read a request with."""
