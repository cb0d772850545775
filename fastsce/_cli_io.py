"""The command's input files: pairing predictions with targets, and reading them.

Formats: .npy (memory-mapped), .npz (one array), .png (8/16-bit, Pillow),
.tif/.tiff (tifffile). A single-page tiled or striped TIFF is also read a
band of rows at a time, decoding only the tiles of those rows, so a map far
larger than memory streams through the Accumulator. Every user error is a
`UserError`: one line naming the file and what to do, and an exit code.
"""
import importlib
import math
from pathlib import Path

import numpy as np

SUFFIXES = (".npy", ".npz", ".png", ".tif", ".tiff")

# Exit codes (listed in `fastsce evaluate --help`); 2 is argparse's usage error.
EXIT_USAGE = 2
EXIT_INPUT = 3      # missing, unreadable, unknown format, unpaired files
EXIT_MISMATCH = 4   # shape or dtype of a pair (or mask, weight) that does not fit
EXIT_TARGETS = 5    # targets outside [0, 1] or NaN
EXIT_OUTPUT = 6     # an output file or folder cannot be written


class UserError(Exception):
    """An error in the user's input or options: no traceback, an exit code."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


def need(module, package, what):
    """Import an optional dependency of the `cli` extra, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{what} needs the {package} package: pip install 'fastsce[cli]'",
                        EXIT_USAGE) from None


def pair_files(pred, target):
    """[(name, pred path, target path)]: two files, or two folders paired by file stem."""
    pred, target = Path(pred), Path(target)
    for path in (pred, target):
        if not path.exists():
            raise UserError(f"{path}: no such file or folder; check the path", EXIT_INPUT)
    if pred.is_file() and target.is_file():
        return [(pred.stem, pred, target)]
    if not (pred.is_dir() and target.is_dir()):
        raise UserError(f"{pred} and {target}: give two files or two folders, not one of each",
                        EXIT_INPUT)
    preds, targets = by_stem(pred), by_stem(target)
    if not preds:
        raise UserError(f"{pred}: no {'/'.join(SUFFIXES)} files in this folder", EXIT_INPUT)
    lonely = [f"{pred} has no target for {_names(preds, targets.keys())}",
              f"{target} has no prediction for {_names(targets, preds.keys())}"]
    lonely = [text for text, names in zip(lonely, (preds.keys() - targets.keys(),
                                                    targets.keys() - preds.keys())) if names]
    if lonely:
        raise UserError("unpaired files (paired by file stem): " + "; ".join(lonely)
                        + "; add the missing files or move these away", EXIT_INPUT)
    return [(stem, preds[stem], targets[stem]) for stem in sorted(preds)]


def by_stem(folder):
    """{stem: path} of the readable files in `folder` (other files are not inputs)."""
    found = {}
    for path in sorted(Path(folder).iterdir()):
        if path.is_file() and path.suffix.lower() in SUFFIXES and not path.name.startswith("."):
            if path.stem in found:
                raise UserError(f"{path} and {found[path.stem].name}: two files with the stem "
                                f"{path.stem!r}; keep one", EXIT_INPUT)
            found[path.stem] = path
    return found


def _names(files, others):
    names = sorted(files[stem].name for stem in files.keys() - others)
    more = f" and {len(names) - 10} more" if len(names) > 10 else ""
    return ", ".join(names[:10]) + more


def open_image(path):
    """The file as an `Image` (its shape and dtype read, its pixels not yet)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise UserError(f"{path}: unknown format {suffix or '(no suffix)'!r}; use one of "
                        f"{', '.join(SUFFIXES)}", EXIT_INPUT)
    try:
        if suffix == ".npy":
            return Image(path, np.load(path, mmap_mode="r", allow_pickle=False))
        if suffix == ".npz":
            return Image(path, _npz(path))
        if suffix == ".png":
            return Image(path, _png(path))
        return _tiff(path)
    except UserError:
        raise
    except (OSError, ValueError, EOFError, SyntaxError) as e:  # PIL reports bad PNGs as SyntaxError
        raise UserError(f"{path}: cannot read it as {suffix} ({_reason(e)}); check the file",
                        EXIT_INPUT) from None


def _reason(e):
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _npz(path):
    with np.load(path, allow_pickle=False) as data:
        if len(data.files) != 1:
            raise UserError(f"{path}: holds {len(data.files)} arrays "
                            f"({', '.join(data.files[:5])}); save one array per file",
                            EXIT_INPUT)
        return data[data.files[0]]


# Pillow modes of soft masks: 8- and 16-bit grey, float; colour channels last.
_PNG_MODES = {"L": None, "I;16": None, "I;16B": None, "I": np.uint16, "F": None,
              "LA": None, "RGB": None, "RGBA": None}


def _png(path):
    image = need("PIL.Image", "Pillow", "reading .png files").open(path)
    with image:
        if image.mode not in _PNG_MODES:
            raise UserError(f"{path}: PNG mode {image.mode!r} is not a soft mask; save 8- or "
                            "16-bit greyscale (or RGB channels with --classes-axis -1)",
                            EXIT_INPUT)
        a = np.asarray(image)
    if _PNG_MODES[image.mode] is not None:  # Pillow may widen 16-bit grey to int32
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise UserError(f"{path}: 32-bit integer PNG values; save 8- or 16-bit", EXIT_INPUT)
        a = a.astype(np.uint16)
    return a


def _tiff(path):
    tifffile = need("tifffile", "tifffile", "reading .tif files")
    tif = tifffile.TiffFile(path)
    try:
        page = tif.pages[0]
        series = tif.series[0]
        # One image plane, samples interleaved: bands of rows are tile rows.
        if len(tif.pages) == 1 and page.shaped[:2] == (1, 1) and not page.is_memmappable:
            return TiledImage(path, tif, page, series.shape, series.dtype)
        data = tifffile.memmap(path, mode="r") if page.is_memmappable else series.asarray()
    except BaseException:
        tif.close()
        raise
    tif.close()
    return Image(path, data)


class Image:
    """A file's array: in memory, or memory-mapped (.npy, contiguous TIFF)."""

    tiled = False
    segment_rows = 1

    def __init__(self, path, array):
        self.path, self.array = path, array
        self.shape, self.dtype = array.shape, array.dtype

    def read(self):
        return self.array

    def rows(self, start, stop, axis=0):
        """Rows [start, stop) of axis `axis`."""
        index = (slice(None),) * axis + (slice(start, stop),)
        return self.array[index]

    def close(self):
        pass


class TiledImage(Image):
    """A single-page tiled or striped TIFF, read whole or a band of rows at a time."""

    tiled = True

    def __init__(self, path, tif, page, shape, dtype):
        self.path, self.tif, self.page = path, tif, page
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.segment_rows, self.segment_cols = page.chunks[0], page.chunks[1]
        self.grid = page.chunked[:2] if len(page.chunked) >= 2 else (page.chunked[0], 1)
        self.nbytes = math.prod(self.shape) * self.dtype.itemsize

    def read(self):
        return self.rows(0, self.shape[0])

    def rows(self, start, stop, axis=0):
        """Rows [start, stop) (axis 0), decoding only the tiles or strips that hold them."""
        out = np.empty((stop - start,) + self.shape[1:], self.dtype)
        fh, page = self.tif.filehandle, self.page
        first, last = start // self.segment_rows, -(-stop // self.segment_rows)
        for i in range(first, last):
            for j in range(self.grid[1]):
                k = i * self.grid[1] + j
                fh.seek(page.dataoffsets[k])
                data, at, shape = page.decode(fh.read(page.databytecounts[k]) or None, k)
                y, x = at[2], at[3]
                tile = (np.zeros(shape, self.dtype) if data is None else data)  # sparse tile
                tile = tile.reshape(tile.shape[1:3] + self.shape[2:])
                a, b = max(y, start), min(y + tile.shape[0], stop)
                w = min(tile.shape[1], self.shape[1] - x)
                out[a - start:b - start, x:x + w] = tile[a - y:b - y, :w]
        return out

    def close(self):
        self.tif.close()
