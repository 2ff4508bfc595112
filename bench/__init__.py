"""Microbenchmarks of ``attention.selective_attention`` (run from a checkout: ``python -m bench``).

Every implementation is checked against a float64 evaluation of the contract on the same inputs
before it is timed, and results are reported as ratios to baselines and device limits measured in
the same run. See docs/bench.md.
"""
