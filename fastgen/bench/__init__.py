"""Benchmarks: speed as a ratio to SDPA in the same run, with error next to speed."""
