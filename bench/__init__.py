"""hpcbrain's benchmarks. Each prints its figures; run one from the project root as a module of
this package, with the project's environment: `.venv/bin/python -m bench.NAME [...]` (the
science benchmarks: `-m bench.science.NAME`). hpcbrain is imported as installed (`make setup`);
what several benchmarks repeat is in `bench.common`."""
