"""TOFU from scratch on real data: `python -m benchmarks.tofu_mini --help`."""
