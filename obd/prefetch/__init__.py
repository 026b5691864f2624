"""Prefetching: traces of the blocks a workload reads, recorded and replayed; an ext4 disk's metadata."""
