"""Data files shipped with obd.

``ext4_64.tar.gz`` is overlaybd's ``baselayers/ext4_64.tar.gz`` byte for byte (66,649 bytes): the
stock base layer, an empty 64 GiB ext4 file system as an old-style ZFile around a sealed LSMT layer
(docs/formats.md §0.4 F1). ``obd convert`` stacks images on it unless asked to ``--mkfs``.
"""
