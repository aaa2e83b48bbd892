"""The benchmark of ratelimit-gw: its runner, load generators, lean upstream and results.

Not part of the product (it ships in neither the wheel nor the image); run it from a checkout
with ``make bench`` or ``python -m benchmarks``.
"""
