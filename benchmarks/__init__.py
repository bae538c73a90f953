"""Reproducible measurements of flowspec (not tests): quality, step cost, overhead, sampling.

Each module runs as ``python -m benchmarks.<name>``, prints its table last and writes a JSON file
under ``benchmarks/results/<cpu|gpu>/``; ``python -m benchmarks.report`` turns those into
docs/results.md.
"""
