"""ZFile: overlaybd's seekable block-compressed container (LZ4 raw blocks or zstd frames)."""
