"""Adapters that expose an obd stack to the outside world (nbdkit, FUSE, VM launcher)."""
