"""The science benchmarks: results with their spread and baselines (`python -m bench.science.NAME`)."""
