"""Speed and efficiency measurements, each a ratio against a baseline (`python -m benchmarks`)."""
