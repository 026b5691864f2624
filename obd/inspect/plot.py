"""Pictures of where each layer's sectors lie across the device (``obd inspect --plot``).

matplotlib is an optional dependency (the ``plot`` extra) and is imported only when a picture is
drawn. The figure is built on the Agg canvas directly (no ``pyplot``, so no global state and no
display needed).

One horizontal band per layer, bottom layer at the bottom: data mappings in the layer's colour,
zeroed (trimmed) mappings in grey. Above them a ``merged`` band shows, for every byte of the device,
the layer a reader gets it from. Mappings narrower than about a pixel are widened to stay visible
(and neighbours that then overlap are drawn as one bar). A second panel shows the mapping-length
histogram of each layer in power-of-two buckets.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from obd.errors import ObdError
from obd.inspect.stack import Band, Layout
from obd.inspect.stats import HISTOGRAM_BUCKETS, length_histogram

ZERO_COLOUR = "#9e9e9e"
#: Bars narrower than this fraction of the axis are widened to it (about two pixels at the default size).
MIN_WIDTH_FRACTION = 1 / 600


def _matplotlib() -> Any:
    # matplotlib is an optional extra (and slow to import): loaded only when a plot is drawn
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter, MaxNLocator, MultipleLocator
    except ImportError as e:
        missing = isinstance(e, ModuleNotFoundError) and (e.name or "").startswith("matplotlib")
        problem = "which is not installed" if missing else f"which failed to import ({e})"
        raise ObdError(
            f"drawing a plot needs matplotlib, {problem}; install the 'plot' extra "
            "(pip install 'overlaybd-py[plot]')",
            field="plot",
        ) from e
    return Figure, FigureCanvasAgg, FuncFormatter, MaxNLocator, MultipleLocator


def axis_bytes(n: float) -> str:
    """A tick label: ``8 GiB``, ``1.5 MiB``, ``512 B``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if float(n).is_integer() else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def coalesce(start: np.ndarray, length: np.ndarray, min_width: float) -> tuple[np.ndarray, np.ndarray]:
    """Widen bars to ``min_width`` and join the ones that then overlap: ``(starts, widths)``."""
    if not len(start):
        return np.zeros(0), np.zeros(0)
    order = np.argsort(start, kind="stable")
    s = np.asarray(start, dtype=np.float64)[order]
    e = s + np.maximum(np.asarray(length, dtype=np.float64)[order], min_width)
    reach = np.maximum.accumulate(e)
    first = np.ones(len(s), dtype=bool)
    first[1:] = s[1:] > reach[:-1]
    heads = np.nonzero(first)[0]
    ends = np.maximum.reduceat(e, heads)
    return s[heads], ends - s[heads]


def _colours(n: int) -> list[Any]:
    from matplotlib import colormaps  # optional extra; _matplotlib() has checked it imports

    cmap = colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "turbo"]
    if n > 20:
        return [cmap(i / max(n - 1, 1)) for i in range(n)]
    return [cmap(i) for i in range(n)]


def _draw_band(ax: Any, y: float, band: Band, colour: Any, min_width: float) -> None:
    # zeroed first, so that data (usually the small, interesting part) is drawn on top
    for mask, face in ((band.zeroed, ZERO_COLOUR), (~band.zeroed, colour)):
        xs, ws = coalesce(band.offset[mask], band.length[mask], min_width)
        if len(xs):
            ax.broken_barh(
                list(zip(xs.tolist(), ws.tolist(), strict=True)), (y - 0.38, 0.76), facecolors=face
            )


def plot_layout(
    layout: Layout,
    path: str | os.PathLike[str],
    *,
    histogram: bool = True,
    title: str | None = None,
    dpi: int = 100,
) -> None:
    """Draw ``layout`` (from :func:`obd.inspect.report.inspect_files`) into the PNG file ``path``."""
    Figure, FigureCanvasAgg, FuncFormatter, MaxNLocator, MultipleLocator = _matplotlib()
    bands = layout.bands
    if not bands:
        raise ObdError("nothing to plot: no LSMT layer", field="plot")
    rows = len(bands) + (layout.merged is not None)
    colours = _colours(len(bands))
    band_height = 0.45 * rows + 1.4
    fig = Figure(figsize=(12, band_height + (3.2 if histogram else 0)), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    if histogram:
        ax, hx = fig.subplots(2, 1, height_ratios=[band_height, 3.2])
    else:
        ax, hx = fig.subplots(1, 1), None

    size = max(int(layout.size), 1)
    min_width = size * MIN_WIDTH_FRACTION
    labels = []
    for y, (band, colour) in enumerate(zip(bands, colours, strict=True)):
        _draw_band(ax, y, band, colour, min_width)
        labels.append(f"#{y} {band.label}")
    merged = layout.merged
    if merged is not None:
        y = len(bands)
        for k, colour in enumerate(colours):
            pick = merged.layer == k
            _draw_band(
                ax,
                y,
                Band("merged", merged.offset[pick], merged.length[pick], merged.zeroed[pick]),
                colour,
                min_width,
            )
        ax.axhline(y - 0.5, color="black", linewidth=0.8)
        labels.append("merged")
    ax.set_yticks(range(rows), labels)
    ax.set_ylim(-0.6, rows - 0.4)
    ax.set_xlim(0, size)
    step = 2 ** max(0, math.ceil(math.log2(size / 8))) if size > 8 else 1
    ax.xaxis.set_major_locator(MultipleLocator(step))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: axis_bytes(v)))
    ax.set_xlabel("device offset")
    ax.grid(axis="x", linestyle=":", linewidth=0.6)
    handles = [_patch(c, f"#{k} {b.label}") for k, (b, c) in enumerate(zip(bands, colours, strict=True))]
    handles.append(_patch(ZERO_COLOUR, "zeroed (trimmed)"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize="small")
    ax.set_title(title or f"{len(bands)} layer(s) over a {axis_bytes(layout.size)} device")

    if hx is not None:
        width = 0.8 / len(bands)
        xs = np.arange(HISTOGRAM_BUCKETS)
        top = 0
        for k, (band, colour) in enumerate(zip(bands, colours, strict=True)):
            counts = [b["count"] for b in length_histogram(band.length // 512)][:HISTOGRAM_BUCKETS]
            top = max(top, *counts)
            hx.bar(xs - 0.4 + width * (k + 0.5), counts, width=width, color=colour, label=band.label)
        hx.set_xticks(
            xs,
            [axis_bytes(512 << k) for k in range(HISTOGRAM_BUCKETS)],
            fontsize="small",
            rotation=30,
            ha="right",
            rotation_mode="anchor",
        )
        hx.yaxis.set_major_locator(MaxNLocator(integer=True))
        hx.set_xlabel("mapping length (bucket [x, 2x))")
        hx.set_ylabel("mappings")
        if top > 50:
            hx.set_yscale("log")
        hx.grid(axis="y", linestyle=":", linewidth=0.6)
    fig.savefig(os.fspath(path), format="png")


def _patch(colour: Any, label: str) -> Any:
    from matplotlib.patches import Patch  # optional extra; _matplotlib() has checked it imports

    return Patch(facecolor=colour, label=label)
