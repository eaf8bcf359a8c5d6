"""The machine: devices and precision, strategies and clusters, memory and FLOPs."""
