"""Small on-disk formats beside LSMT and ZFile.

overlaybd's CRC32C, its tar envelope, and turboOCI's gzip index.
"""
