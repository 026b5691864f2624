"""The operations of overlaybd's command-line tools, as functions: create, commit, seal, merge.

Each mirrors its overlaybd counterpart byte for byte where the format allows (FORMATS.md §1.12–
§1.16): ``overlaybd-create``, ``overlaybd-commit`` (plain, ``-z``, ``-t``, ``--seal``,
``--commit_sealed``, ``--turboOCI``) and ``overlaybd-merge``. Outputs are published atomically.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from obd.blob_writer import BlobWriter
from obd.errors import ObdError
from obd.lsmt.commit import SealedInfo, layer_info, seal_in_place, write_sealed
from obd.lsmt.format import MAX_OFFSET, HeaderTrailer
from obd.lsmt.rw import RWLayer, create_rw
from obd.lsmt.stack import Stack
from obd.lsmt.warp import WarpRWLayer, commit_warp

GiB = 1 << 30


@dataclass(frozen=True)
class OutputOptions:
    """How a sealed blob is written: plain, or ZFile (``compress``) and/or tar-wrapped."""

    compress: str | None = None  # None, "lz4", "zstd"
    block_size: int = 4096
    verify: bool = True
    tar: bool = False
    overwrite_header: bool = True


@dataclass(frozen=True)
class WriteResult:
    path: str
    info: SealedInfo
    file_bytes: int


def create_layer(
    data_path: str,
    index_path: str | None,
    virtual_size: int,
    *,
    sparse: bool = False,
    uuid: str | None = None,
    parent_uuid: str | None = None,
) -> RWLayer:
    """``overlaybd-create [-s] [-u PARENT] DATA INDEX GB`` (``virtual_size`` in bytes here)."""
    if virtual_size < 0 or virtual_size % 512:
        raise ObdError(
            "virtual size must be a non-negative multiple of 512 bytes", field="vsize", value=virtual_size
        )
    return create_rw(data_path, index_path, virtual_size, sparse=sparse, uuid=uuid, parent_uuid=parent_uuid)


def _write(out_path: str, opts: OutputOptions, body: Callable[[BlobWriter], SealedInfo]) -> WriteResult:
    with BlobWriter(
        out_path,
        compress=opts.compress,
        block_size=opts.block_size,
        verify=opts.verify,
        tar=opts.tar,
        overwrite_header=opts.overwrite_header,
    ) as out:
        info = body(out)
    return WriteResult(out_path, info, out.size)


def commit_layer(
    layer: RWLayer,
    out_path: str,
    *,
    uuid: str | None = None,
    parent_uuid: str | None = None,
    message: str = "",
    options: OutputOptions = OutputOptions(),
    progress: Callable[[int], None] | None = None,
) -> WriteResult:
    """``overlaybd-commit DATA INDEX OUT``: compact an RW layer into a sealed blob.

    As overlaybd does: the virtual size comes from the data file's header, the uuid is null unless
    given, the parent is the data header's unless given. A turboOCI layer needs
    :func:`commit_warp_layer` instead.
    """
    if isinstance(layer, WarpRWLayer):
        raise ObdError(
            "a turboOCI (warp) layer: commit it with --turboOCI/--fastoci (commit_warp_layer)",
            path=layer.index_path,
        )
    header = layer_info(
        layer.header.virtual_size, uuid=uuid, parent_uuid=parent_uuid or layer.parent_uuid, user_tag=message
    )
    mappings = [(o, ln, m, z, 0) for o, ln, m, z, _t in layer.dump()]
    return _write(
        out_path, options, lambda out: write_sealed(out, mappings, layer.files, header, progress=progress)
    )


def commit_warp_layer(
    layer: WarpRWLayer,
    out_path: str,
    *,
    uuid: str | None = None,
    parent_uuid: str | None = None,
    options: OutputOptions = OutputOptions(),
    progress: Callable[[int], None] | None = None,
) -> WriteResult:
    """``overlaybd-commit --turboOCI`` (alias ``--fastoci``) ``DATA INDEX OUT``: seal a turboOCI layer.

    The turboOCI builder runs it with ``-z`` (``options=OutputOptions(compress="lz4")``) and renames
    the result ``ext4.fs.meta``. The virtual size is the layer's, the uuid and parent are null
    unless given, and no commit message is ever written (overlaybd drops ``-m`` here).
    """
    return _write(
        out_path,
        options,
        lambda out: commit_warp(layer, out, uuid=uuid, parent_uuid=parent_uuid, progress=progress),
    )


def commit_sealed(
    layer_stack: Stack,
    out_path: str,
    *,
    uuid: str | None = None,
    parent_uuid: str | None = None,
    message: str = "",
    options: OutputOptions = OutputOptions(),
    progress: Callable[[int], None] | None = None,
) -> WriteResult:
    """``overlaybd-commit --commit_sealed SEALED OUT``: re-compact one sealed layer."""
    if len(layer_stack.lowers) != 1 or layer_stack.upper is not None:
        raise ObdError("--commit-sealed takes exactly one sealed layer")
    layer = layer_stack.lowers[0]
    src: HeaderTrailer = layer.header  # type: ignore[attr-defined]
    header = layer_info(
        src.virtual_size, uuid=uuid, parent_uuid=parent_uuid or src.parent_uuid, user_tag=message
    )
    mappings = list(layer.index)
    return _write(
        out_path, options, lambda out: write_sealed(out, mappings, layer.files, header, progress=progress)
    )


def seal_layer(layer: RWLayer) -> HeaderTrailer:
    """``overlaybd-commit --seal DATA INDEX``: turn the RW data file itself into a sealed layer."""
    return seal_in_place(layer)


def merge_stack(
    stack: Stack,
    out_path: str,
    *,
    uuid: str | None = None,
    parent_uuid: str | None = None,
    message: str = "",
    options: OutputOptions = OutputOptions(compress="lz4"),
    progress: Callable[[int], None] | None = None,
) -> WriteResult:
    """``overlaybd-merge``: flatten a stack into one sealed layer.

    The virtual size comes from the top lower's header, the parent uuid from the bottom lower's
    (for a stack with an RW upper: from the upper's data header), as overlaybd does; each index
    entry keeps the position of its source layer counted from the top in its tag.
    """
    if not stack.lowers and stack.upper is None:
        raise ObdError("nothing to merge")
    if stack.lowers:
        vsize = stack.lowers[-1].header.virtual_size  # type: ignore[attr-defined]
        parent = stack.lowers[0].header.parent_uuid  # type: ignore[attr-defined]
    else:
        vsize = stack.upper.header.virtual_size  # type: ignore[union-attr]
        parent = stack.upper.parent_uuid  # type: ignore[union-attr]
    if stack.upper is not None:
        parent = stack.upper.parent_uuid
    header = layer_info(vsize, uuid=uuid, parent_uuid=parent_uuid or parent, user_tag=message)
    # the stack's file slots are already overlaybd's order: top-most lower first, the RW upper last
    mappings = stack.lookup(0, MAX_OFFSET)
    return _write(
        out_path, options, lambda out: write_sealed(out, mappings, stack.files, header, progress=progress)
    )


def gib(n: float) -> int:
    return int(n * GiB)
