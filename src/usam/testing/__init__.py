"""Test machinery that ships with usam: tiny random models built in code, synthetic
embedding shards, and the oracle that holds a mask engine to its official generator.

None of it makes a result. The tiny models and synthetic shards exist so that the test
suite, the benchmarks and the offline demo run in seconds with no weights; the user-facing
options ``generate=tiny``, ``data=synthetic`` and ``baseline.sam3.model=tiny`` build them,
and everything they produce is marked random-weight. ``agreement`` is the exactness
oracle the tests and ``benchmarks/extract_speed.py`` use. The pipeline's stages import
this package only where such a user-facing option needs it.
"""
