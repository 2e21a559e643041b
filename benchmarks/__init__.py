"""scripts/bench: synthetic configs, a decision microbenchmark and end-to-end load against mitmdump."""
