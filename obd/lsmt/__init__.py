"""LSMT: overlaybd's log-structured layer format (sealed layers, RW layers, stacks)."""
