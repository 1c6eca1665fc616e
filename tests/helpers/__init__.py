"""Code the tests share: config composition, child processes, tiny data and references."""
