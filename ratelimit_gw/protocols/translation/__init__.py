"""Translation between the three chat protocols, for the converter routes (docs/converters.md).

One codec per protocol reads and writes :mod:`.ir`, the shape every translation passes
through; a converter is the caller's adapter and codec, the upstream's adapter and codec.
"""
