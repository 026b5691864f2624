"""Prefetching: traces of the blocks a workload reads, recorded and replayed."""
