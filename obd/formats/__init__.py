"""Small on-disk formats beside LSMT and ZFile.

overlaybd's CRC32C, its tar envelope, turboOCI's gzip index, and the ext4 metadata structures.
"""
