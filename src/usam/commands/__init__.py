"""What each command does; ``usam/<command>.py`` is only its entry (``python -m usam.<command>``),
kept light so that ``--help`` and ``--version`` answer without loading torch."""
