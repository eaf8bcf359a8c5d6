"""Benchmarks of tfgpt: training, data and serving speed, and the GPU check (not part of the installed package)."""
