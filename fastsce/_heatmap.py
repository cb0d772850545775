"""Heatmap PNGs of per-pixel (or per-tile) maps, with a labelled color scale.

Maps larger than `MAX_SIDE` are mean-pooled as they stream in (`Pooled`),
so a map of any size gives a picture of bounded size. Colors come from
small anchor tables (matplotlib's inferno; a blue-white-red diverging map
for signed gradients) interpolated to 256 entries: no plotting library.
"""
import numpy as np

from ._cli_io import need

MAX_SIDE = 1024
_CHUNK = 1 << 20

_INFERNO = [(0, 0, 4), (31, 12, 72), (85, 15, 109), (136, 34, 106), (186, 54, 85),
            (227, 89, 51), (249, 140, 10), (249, 201, 50), (252, 255, 164)]
_DIVERGING = [(59, 76, 192), (124, 159, 249), (221, 221, 221), (245, 156, 125), (180, 4, 38)]
_NAN_COLOR = (128, 128, 128)


def _lut(anchors):
    anchors = np.asarray(anchors, np.float64)
    at = np.linspace(0, 1, len(anchors))
    t = np.linspace(0, 1, 256)
    return np.stack([np.interp(t, at, anchors[:, c]) for c in range(3)], 1).round().astype(np.uint8)


COLORMAPS = {"inferno": _lut(_INFERNO), "diverging": _lut(_DIVERGING)}


class Pooled:
    """Mean of a (H, W) map over f x f pixel cells, fed a band of rows at a time."""

    def __init__(self, height, width):
        self.f = max(1, -(-max(height, width) // MAX_SIDE))
        self.width = width
        shape = (-(-height // self.f), -(-width // self.f))
        self.sum, self.count = np.zeros(shape), np.zeros(shape, np.int64)

    def add(self, start, band):
        """Add rows [start, start + len(band)) of the map; NaN pixels are left out."""
        cols = np.arange(0, self.width, self.f)
        step = max(1, _CHUNK // max(self.width, 1))  # float64 temporaries of bounded size
        for r in range(0, len(band), step):
            part = np.asarray(band[r:r + step], np.float64)
            finite = ~np.isnan(part)
            rows = (start + r + np.arange(part.shape[0])) // self.f
            for values, total in ((np.where(finite, part, 0.0), self.sum), (finite, self.count)):
                np.add.at(total, rows, np.add.reduceat(values, cols, axis=1))

    def mean(self):
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, self.sum / np.maximum(self.count, 1), np.nan)


def render(values, title, signed=False, scale=1):
    """An RGB Pillow image of the 2-D map `values` and its color scale.

    The scale runs from 0 (or -v for `signed`) to the 99.5th percentile v of
    the finite |values|, so a few extreme pixels do not wash out the rest;
    larger values take the top color, NaN is grey. It is a square-root scale
    (labelled in values), so small losses at soft borders stay visible beside
    large ones at wrong predictions. `scale` enlarges pixels (per-tile maps).
    """
    Image = need("PIL.Image", "Pillow", "--save-maps")
    ImageDraw = need("PIL.ImageDraw", "Pillow", "--save-maps")
    values = np.asarray(values, np.float64)
    finite = values[np.isfinite(values)]
    top = float(np.percentile(np.abs(finite), 99.5)) if finite.size else 0.0
    top = top if top > 0 else 1.0
    lut = COLORMAPS["diverging" if signed else "inferno"]
    with np.errstate(invalid="ignore"):
        pos = np.sign(values) * np.sqrt(np.minimum(np.abs(values) / top, 1.0))  # in [-1, 1]
        level = ((pos + 1) * 127.5) if signed else pos * 255
    rgb = lut[np.nan_to_num(level, nan=0).astype(np.uint8)]
    rgb[np.isnan(values)] = _NAN_COLOR
    rgb = rgb.repeat(scale, axis=0).repeat(scale, axis=1)
    h, w = rgb.shape[:2]
    bar_h = max(h, 160)
    canvas = Image.new("RGB", (w + 110, bar_h + 24), "white")
    canvas.paste(Image.fromarray(rgb), (0, 24))
    bar = lut[np.linspace(255, 0, bar_h).astype(np.uint8)][:, None].repeat(16, axis=1)
    canvas.paste(Image.fromarray(np.ascontiguousarray(bar)), (w + 10, 24))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 6), title, fill="black")
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = 24 + round((1 - frac) * (bar_h - 1))
        p = 2 * frac - 1 if signed else frac       # the position's value, inverted
        draw.line([(w + 26, y), (w + 30, y)], fill="black")
        draw.text((w + 33, min(max(y - 6, 24), bar_h + 12)), f"{np.sign(p) * p * p * top:.3g}",
                  fill="black")
    return canvas

