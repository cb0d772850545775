"""`fastsce evaluate`: score folders of predicted masks against soft targets.

Each pair of files is one image. Files that fit in memory (or map into it:
.npy, uncompressed TIFF) go through `fastsce.evaluate`, so the table shows
its numbers; a tiled or striped TIFF larger than --stream-above is read a
band of rows at a time into an `EvaluationStream` (Accumulators), equal to
`evaluate` within 1e-12 (bitwise when bands fall on block edges, which
the band height is chosen for when the width allows). Every input is checked
before the first image is scored, and outputs appear only when all
succeeded, each written whole (temporary file, then a rename).
"""
import argparse
import csv
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import _heatmap, sigmoid_cross_entropy, softmax_cross_entropy
from ._cli_io import (EXIT_INPUT, EXIT_MISMATCH, EXIT_OUTPUT, EXIT_TARGETS, UserError,
                      by_stem, need, open_image, pair_files)
from ._backends import BACKENDS
from ._errors import FastSCEError, TargetRangeError
from ._evaluate import EvaluationStream, evaluate
from ._layout import BLOCK
from ._sample import soft_masks

EPILOG = """\
PRED and TARGET are two files, or two folders whose files are paired by
file stem (pred/a.npy with target/a.png). Formats: .npy, .npz (one array),
.png (8/16-bit), .tif/.tiff (also BigTIFF and tiled files larger than
memory). uint8/uint16 values mean value/255 and value/65535 (multiclass
integer targets without the class axis are class indices). Without PRED
and TARGET, a built-in sample is generated and evaluated.

exit codes:
  0  all pairs evaluated
  2  bad option, or a missing optional package (pip install 'fastsce[cli]')
  3  a file is missing, unreadable, of unknown format, or unpaired
  4  shape or dtype of a pair (or of --mask/--weight) does not fit
  5  targets outside [0, 1] or NaN
  6  an output file or folder cannot be written
"""

_SCORES = ("cross_entropy", "kl_divergence", "target_entropy", "valid", "nonfinite")
_BAND_BYTES = 32 << 20   # a band of rows of the largest input when streaming


def add_parser(sub):
    p = sub.add_parser(
        "evaluate", help="score predicted masks against soft targets (default: built-in sample)",
        description="Score predicted masks against soft-label targets: per image "
                    "cross-entropy, KL divergence, target entropy, valid pixels, "
                    "non-finite logits; heatmaps of where the model is wrong.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pred", nargs="?", help="prediction file or folder (logits, or --from-probs)")
    p.add_argument("target", nargs="?", help="soft-target file or folder")
    p.add_argument("--classes-axis", type=int, metavar="K",
                   help="multiclass (softmax): the class axis of each file, e.g. 0 for "
                        "(C, H, W), -1 for (H, W, C); default: binary (sigmoid), one channel")
    p.add_argument("--from-probs", action="store_true",
                   help="predictions are probabilities, not logits")
    p.add_argument("--mask", metavar="PATH",
                   help="a file, or a folder paired by stem: pixels where it is 0 are left out")
    p.add_argument("--weight", metavar="PATH", help="per-pixel weights: a file or a folder")
    p.add_argument("--pos-weight", type=float, help="weight of the positive term (binary)")
    p.add_argument("--label-smoothing", type=float, default=0.0, metavar="EPS")
    p.add_argument("--divergence", action="store_true",
                   help="heatmaps and the worst-image ranking use KL divergence, not "
                        "cross-entropy (the table shows both)")
    p.add_argument("--tile", type=int, nargs=2, metavar=("H", "W"),
                   help="also score tiles of H x W pixels (CSV/JSON rows, tile heatmaps)")
    p.add_argument("--backend", choices=("auto", "c", "numba", "numpy"), default=None,
                   help="default: FASTSCE_BACKEND if set, else c when it loads (a one-shot "
                        "command: Numba's first compile in a fresh environment takes "
                        "seconds), else auto")
    p.add_argument("--threads", type=int, default=None, help="threads (default: all CPUs)")
    p.add_argument("--csv", metavar="FILE", help="write per-image (and per-tile) rows as CSV")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--save-maps", metavar="DIR",
                   help="write heatmap PNGs of the loss and gradient per image "
                        "(default for the built-in sample: ./fastsce-maps)")
    p.add_argument("--stream-above", type=float, default=256, metavar="MB",
                   help="read tiled/striped TIFFs larger than this tile row by tile row "
                        "(default 256)")
    p.add_argument("--images", type=int, default=4, help="built-in sample: number of images")
    p.add_argument("--size", type=int, default=512, help="built-in sample: side in pixels")
    return p


def default_backend():
    """The backend without --backend: FASTSCE_BACKEND's (None), else C when it
    loads: a one-shot command should not wait for Numba's first compile."""
    return None if os.environ.get("FASTSCE_BACKEND") or not BACKENDS["c"].available else "c"


def run(args, parser):
    """`fastsce evaluate`: the exit code; user errors print one line, no traceback."""
    if (args.pred is None) != (args.target is None):
        parser.error("give both PRED and TARGET, or neither (built-in sample)")
    if args.divergence and args.pos_weight is not None:
        parser.error("--divergence is not defined with --pos-weight; drop one")
    if args.classes_axis is not None and args.pos_weight is not None:
        parser.error("--pos-weight applies to binary masks; leave out --classes-axis")
    args.backend = args.backend or default_backend()
    try:
        if args.pred is None:
            return _sample(args)
        return _evaluate_files(args)
    except UserError as e:
        _Progress.clear()
        print(f"fastsce: error: {e}", file=sys.stderr)
        return e.code


def _sample(args):
    Image = need("PIL.Image", "Pillow", "the built-in sample (16-bit PNG targets)")
    with tempfile.TemporaryDirectory(prefix="fastsce-sample-") as folder:
        targets, logits = soft_masks(args.images, args.size, seed=0)
        pred, target = Path(folder, "pred"), Path(folder, "target")
        pred.mkdir()
        target.mkdir()
        for i in range(args.images):
            np.save(pred / f"sample_{i}.npy", logits[i])
            codes = np.round(targets[i] * 65535).astype(np.uint16)
            Image.fromarray(codes).save(target / f"sample_{i}.png")
        print(f"built-in sample: {args.images} soft masks of {args.size}x{args.size} (16-bit "
              f"PNG, blurred borders) and logits (.npy) of increasing noise, one wrong region "
              f"each, in {folder}")
        args.pred, args.target = str(pred), str(target)
        args.save_maps = args.save_maps or "fastsce-maps"
        args.tile = args.tile or [max(1, args.size // 8)] * 2
        return _evaluate_files(args)


def _evaluate_files(args):
    pairs = pair_files(args.pred, args.target)
    sides = {name: (_side(args.mask, name, "--mask"), _side(args.weight, name, "--weight"))
             for name, _, _ in pairs}
    for path in (args.csv, args.json):
        if path and not Path(path).resolve().parent.is_dir():
            raise UserError(f"{path}: its folder does not exist; create it first", EXIT_OUTPUT)
    for name, pred, target in pairs:           # every pair checked before any is scored
        with _Opened(pred, target, *sides[name]) as files:
            _layout(files, args)
    maps = _Staging(args.save_maps) if args.save_maps else None
    progress = _Progress(len(pairs))
    results = []
    try:
        for i, (name, pred, target) in enumerate(pairs):
            progress.start(i, name)
            results.append(_score(name, pred, target, sides[name], args, maps, progress))
        progress.clear()
        _table(results, args)
        if args.csv:
            _atomic_text(args.csv, _csv_text(results))
        if args.json:
            _atomic_text(args.json, json.dumps(_json(results, args), indent=1) + "\n")
        if maps:
            maps.commit()
            print(f"heatmaps: {args.save_maps}{os.sep} (<image>_loss.png, <image>_grad.png"
                  + (", <image>_tiles.png" if args.tile else "") + ")")
    finally:
        progress.clear()
        if maps:
            maps.discard()
    return 0


def _side(path, name, option):
    """The --mask / --weight file for image `name`: the file itself, or name's in a folder."""
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        found = by_stem(p)
        if name not in found:
            raise UserError(f"{p}: no {option} file for image {name!r}; add {name}.npy/.png/.tif",
                            EXIT_INPUT)
        return found[name]
    if not p.exists():
        raise UserError(f"{p}: no such {option} file or folder; check the path", EXIT_INPUT)
    return p


class _Opened:
    """The pair's images (and mask, weight), closed on exit."""

    def __init__(self, *paths):
        self.paths = paths

    def __enter__(self):
        self.images = []
        try:
            for path in self.paths:
                self.images.append(None if path is None else open_image(path))
        except BaseException:
            self.__exit__()
            raise
        return self.images

    def __exit__(self, *exc):
        for image in self.images:
            if image is not None:
                image.close()


class _Layout:
    """How a pair's arrays are read: loss kind, class axis, pixel shape."""

    def __init__(self, loss, axis, pixels):
        self.loss, self.axis, self.pixels = loss, axis, pixels


def _squeezed(image):
    """An in-memory image without length-1 axes beyond two (a (1, H, W) mask is (H, W))."""
    if not image.tiled and image.array.ndim > 2:
        shape = tuple(n for n in image.shape if n != 1)
        shape = shape if len(shape) >= 2 else image.shape[-2:]
        image.array = image.array.reshape(shape)
        image.shape = shape
    return image


def _layout(files, args):
    """Check the pair's shapes and dtypes (naming the file and the fix); its _Layout."""
    pred, target, mask, weight = files
    if args.classes_axis is None:
        pred, target = _squeezed(pred), _squeezed(target)
        if len(pred.shape) != 2:
            raise UserError(f"{pred.path}: shape {pred.shape} is not one binary mask (H, W); "
                            "for multiclass pass --classes-axis", EXIT_MISMATCH)
        loss, axis, pixels, labels = "sigmoid", None, pred.shape, False
    else:
        if len(pred.shape) != 3 or not -3 <= args.classes_axis < 3:
            raise UserError(f"{pred.path}: shape {pred.shape} has no class axis "
                            f"{args.classes_axis}; multiclass files are (C, H, W) or (H, W, C)",
                            EXIT_MISMATCH)
        axis = args.classes_axis % 3
        pixels = pred.shape[:axis] + pred.shape[axis + 1:]
        labels = target.shape == pixels and target.dtype.kind in "iu"
        loss = "softmax"
    if target.shape != pred.shape and not labels:
        raise UserError(f"{target.path}: shape {target.shape} does not match the prediction "
                        f"{pred.path.name} {pred.shape}; save targets of the same shape",
                        EXIT_MISMATCH)
    if pred.dtype.kind in "iu" and not args.from_probs:
        raise UserError(f"{pred.path}: {pred.dtype} values are probabilities, not logits; "
                        "pass --from-probs (or save float logits)", EXIT_MISMATCH)
    if pred.dtype.kind not in "fiu" or pred.dtype.itemsize > 8 or pred.dtype.kind in "iu" \
            and pred.dtype not in (np.uint8, np.uint16):
        raise UserError(f"{pred.path}: dtype {pred.dtype} is not a prediction; save float32/64 "
                        "(or uint8/uint16 probabilities)", EXIT_MISMATCH)
    if target.dtype.kind not in "fiu" or (target.dtype.kind in "iu" and not labels
                                          and target.dtype not in (np.uint8, np.uint16)):
        raise UserError(f"{target.path}: dtype {target.dtype} is not a soft target; save "
                        "float, uint8 or uint16 (value/255, value/65535)", EXIT_MISMATCH)
    for extra, option in ((mask, "--mask"), (weight, "--weight")):
        if extra is not None:
            _squeezed(extra)
            if extra.shape != pixels:
                raise UserError(f"{extra.path}: {option} shape {extra.shape} does not match the "
                                f"image's pixels {pixels} ({pred.path.name})", EXIT_MISMATCH)
    return _Layout(loss, axis, pixels)


def _logits(a, from_probs):
    """Predictions as the kernels take them: float32/64; integer probabilities scaled."""
    a = np.asarray(a)
    if a.dtype.kind in "iu":
        return a.astype(np.float32) / np.float32(np.iinfo(a.dtype).max)
    return a.astype(np.float32) if a.dtype == np.float16 else a


def _score(name, pred_path, target_path, side, args, maps, progress):
    with _Opened(pred_path, target_path, *side) as files:
        layout = _layout(files, args)
        limit = args.stream_above * 2**20
        streamed = any(f is not None and f.tiled and f.nbytes > limit for f in files) \
            and layout.axis != 0
        begin = time.perf_counter()
        try:
            run = _streamed if streamed else _in_memory
            ev, tiles, pooled = run(files, layout, args, progress)
        except TargetRangeError as e:
            found = str(e).split(". Fix")[0].replace("`targets` must be", "targets must be")
            raise UserError(f"{target_path}: {found}; rescale the targets to [0, 1] or save "
                            "them as uint8/uint16", EXIT_TARGETS) from None
        except FastSCEError as e:
            raise UserError(f"{pred_path} / {target_path}: {e}", EXIT_MISMATCH) from None
        seconds = time.perf_counter() - begin
        if maps:
            _save_maps(maps, name, pooled, tiles, layout, args)
    return dict(image=name, pred=str(pred_path), target=str(target_path), seconds=seconds,
                evaluation=ev, tiles=tiles, streamed=streamed)


def _options(args, layout):
    common = dict(label_smoothing=args.label_smoothing, from_logits=not args.from_probs,
                  backend=args.backend, num_threads=args.threads)
    if layout.loss == "softmax":
        common.update(loss="softmax", axis=layout.axis + 1)
    return common


def _in_memory(files, layout, args, progress):
    pred, target, mask, weight = (None if f is None else f.read() for f in files)
    x = _logits(pred, args.from_probs)
    m = None if mask is None else np.asarray(mask) != 0
    w = None if weight is None else np.asarray(weight)
    extra = dict(mask=None if m is None else m[None], weight=None if w is None else w[None])
    if args.pos_weight is not None:
        extra["pos_weight"] = args.pos_weight
    options = _options(args, layout)
    ev = evaluate(x[None], target[None], **options, **extra)
    tiles = evaluate(x[None], target[None], tile_shape=tuple(args.tile), **options, **extra) \
        if args.tile else None
    pooled = _Maps(layout.pixels) if args.save_maps else None
    if pooled:
        pooled.add(0, *_map_pass(x, target, m, w, layout, args))
    return ev, tiles, pooled


def _streamed(files, layout, args, progress):
    pred, target, mask, weight = files
    H = layout.pixels[0]
    band = _band_rows(files, layout, args)
    options = _options(args, layout)
    loss = options.pop("loss", "sigmoid")
    axis = options.pop("axis", 1)
    shape = (1,) + pred.shape
    kinds = dict(loss=loss, axis=axis, with_pos_weight=args.pos_weight is not None)
    stream = EvaluationStream(shape, **kinds, **options)
    tiles = EvaluationStream(shape, tile_shape=tuple(args.tile), **kinds, **options) \
        if args.tile else None
    pooled = _Maps(layout.pixels) if args.save_maps else None
    for r in range(0, H, band):
        stop = min(r + band, H)
        x = _logits(pred.rows(r, stop), args.from_probs)
        z = target.rows(r, stop)
        m = None if mask is None else np.asarray(mask.rows(r, stop)) != 0
        w = None if weight is None else np.asarray(weight.rows(r, stop))
        index = (slice(0, 1), slice(r, stop))
        extra = dict(mask=None if m is None else m[None], weight=None if w is None else w[None])
        if args.pos_weight is not None:
            extra["pos_weight"] = args.pos_weight
        for s in (stream, tiles):
            if s is not None:
                s.add(x[None], z[None], index, **extra)
        if pooled:
            pooled.add(r, *_map_pass(x, z, m, w, layout, args))
        progress.rows(stop, H)
    return stream.result(), tiles.result() if tiles else None, pooled


def _band_rows(files, layout, args):
    """Rows per band: whole tile rows of every tiled input, grown to fall on block (and
    --tile) edges so the sums are bitwise those of one call, while a band stays small."""
    H, W = layout.pixels
    unit = 1
    for f in files:
        if f is not None:
            unit = math.lcm(unit, f.segment_rows)
    row_bytes = sum(math.prod(f.shape[1:]) * f.dtype.itemsize for f in files if f is not None)
    for align in (BLOCK // math.gcd(W, BLOCK), args.tile[0] if args.tile else 1):
        if math.lcm(unit, align) * row_bytes <= _BAND_BYTES:
            unit = math.lcm(unit, align)
    return max(unit, _BAND_BYTES // max(row_bytes * unit, 1) * unit)


def _map_pass(x, z, m, w, layout, args):
    """(loss map, gradient map) of the pixels: the gradient signed (binary) or its
    norm over the classes (softmax)."""
    options = dict(reduction="none", divergence=args.divergence, mask=m, weight=w,
                   label_smoothing=args.label_smoothing, from_logits=not args.from_probs,
                   backend=args.backend, num_threads=args.threads)
    if layout.loss == "sigmoid":
        return tuple(sigmoid_cross_entropy(x, z, pos_weight=args.pos_weight, **options))
    loss, grad = softmax_cross_entropy(x, z, axis=layout.axis, **options)
    return loss, np.sqrt(np.sum(np.square(grad, dtype=np.float64), axis=layout.axis))


class _Maps:
    """Pooled loss and gradient maps of one image."""

    def __init__(self, pixels):
        self.loss, self.grad = _heatmap.Pooled(*pixels), _heatmap.Pooled(*pixels)

    def add(self, start, loss, grad):
        self.loss.add(start, loss)
        self.grad.add(start, grad)


def _save_maps(maps, name, pooled, tiles, layout, args):
    what = "KL divergence" if args.divergence else "cross-entropy"
    wrt = "probability" if args.from_probs else "logit"
    cell = "" if pooled.loss.f == 1 else f" (mean of {pooled.loss.f}x{pooled.loss.f} pixels)"
    grad_title = (f"{name}: d loss / d {wrt}" if layout.loss == "sigmoid"
                  else f"{name}: |d loss / d {wrt}s| over classes")
    maps.save(f"{name}_loss.png",
              _heatmap.render(pooled.loss.mean(), f"{name}: {what} per pixel{cell}"))
    maps.save(f"{name}_grad.png", _heatmap.render(pooled.grad.mean(), grad_title + cell,
                                                  signed=layout.loss == "sigmoid"))
    if tiles is not None:
        per = (tiles.kl_divergence if args.divergence else tiles.cross_entropy)[0]
        scale = max(1, min(256 // max(per.shape), _heatmap.MAX_SIDE // max(per.shape)))
        maps.save(f"{name}_tiles.png", _heatmap.render(
            per, f"{name}: mean {what} per {args.tile[0]}x{args.tile[1]} tile", scale=scale))


class _Staging:
    """Heatmaps are written to a hidden folder inside DIR and moved in only when every
    image succeeded, so a failed run leaves no partial set of maps."""

    def __init__(self, folder):
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
            self.tmp = tempfile.mkdtemp(prefix=".fastsce-", dir=folder)
        except OSError as e:
            raise UserError(f"{folder}: cannot write heatmaps here ({e.strerror}); "
                            "choose another --save-maps folder", EXIT_OUTPUT) from None
        self.folder, self.names = folder, []

    def save(self, filename, image):
        image.save(os.path.join(self.tmp, filename), format="PNG")
        self.names.append(filename)

    def commit(self):
        for filename in self.names:
            os.replace(os.path.join(self.tmp, filename), os.path.join(self.folder, filename))
        self.names = []

    def discard(self):
        shutil.rmtree(self.tmp, ignore_errors=True)


def _atomic_text(path, text):
    """Write `text` to `path` whole: a temporary file beside it, then a rename."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".fastsce-", dir=folder)
    except OSError as e:
        raise UserError(f"{path}: cannot write it ({e.strerror}); choose another path",
                        EXIT_OUTPUT) from None
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class _Progress:
    """One self-overwriting line on stderr, only when stderr is a terminal (never in
    piped or redirected output)."""

    shown = False

    def __init__(self, total):
        self.total, self.on = total, sys.stderr.isatty()
        self.begin = time.perf_counter()

    def start(self, i, name):
        self.i, self.name = i, name
        self._show("")

    def rows(self, done, total):
        if done < total:
            self._show(f"  rows {done:,}/{total:,}")

    def _show(self, detail):
        if self.on:
            elapsed = time.perf_counter() - self.begin
            sys.stderr.write(f"\r\033[K[{self.i + 1}/{self.total}] {self.name}{detail}  "
                             f"{elapsed:.1f} s")
            sys.stderr.flush()
            _Progress.shown = True

    @staticmethod
    def clear():
        if _Progress.shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            _Progress.shown = False


def _table(results, args):
    head = (f"{'image':20} {'cross-entropy':>13} {'KL':>11} {'entropy':>11} {'valid':>12} "
            f"{'non-finite':>10} {'time':>9}")
    print(head)
    for r in results:
        ev = r["evaluation"]
        ce, kl, h = (float(getattr(ev, k)[0]) for k in _SCORES[:3])
        print(f"{r['image'][:20]:20} {ce:13.6g} {kl:11.6g} {h:11.6g} {int(ev.valid[0]):12,} "
              f"{int(ev.nonfinite[0]):10,} {r['seconds'] * 1e3:6.0f} ms")
    print(_summary(results, args))


def _summary(results, args):
    valid = np.array([r["evaluation"].valid[0] for r in results], np.float64)
    ce = np.array([r["evaluation"].cross_entropy[0] for r in results])
    kl = np.array([r["evaluation"].kl_divergence[0] for r in results])
    key, label = (kl, "KL") if not np.all(np.isnan(kl)) else (ce, "cross-entropy")
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_ce = np.nansum(ce * valid) / valid[~np.isnan(ce)].sum()
        mean_kl = np.nansum(kl * valid) / valid[~np.isnan(kl)].sum()
    text = (f"{len(results)} images, {int(valid.sum()):,} valid pixels: cross-entropy "
            f"{mean_ce:.6g}, KL {mean_kl:.6g} (mean over all valid pixels)")
    if not np.all(np.isnan(key)):
        worst = int(np.nanargmax(key))
        text += f"; worst by {label}: {results[worst]['image']} ({key[worst]:.6g})"
    if args.tile:
        best = None
        for r in results:
            per = r["tiles"].kl_divergence if label == "KL" else r["tiles"].cross_entropy
            if not np.all(np.isnan(per)):
                at = np.unravel_index(np.nanargmax(per), per.shape)
                if best is None or per[at] > best[0]:
                    best = (per[at], r["image"], at[1:])
        if best:
            text += (f"; worst {args.tile[0]}x{args.tile[1]} tile: {best[1]} row {best[2][0]} "
                     f"col {best[2][1]} ({best[0]:.6g})")
    return text


def _csv_text(results):
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["image", "tile_row", "tile_col", *_SCORES, "seconds", "pred", "target"])
    for r in results:
        ev = r["evaluation"]
        writer.writerow([r["image"], "", "", *(getattr(ev, k)[0].item() for k in _SCORES),
                         r["seconds"], r["pred"], r["target"]])
        if r["tiles"] is not None:
            for row in r["tiles"].rows():
                if row[0] == "image":
                    continue
                writer.writerow([r["image"], row[1], row[2], *row[3:], "", "", ""])
    return out.getvalue()


def _plain(a):
    """JSON values: NaN and infinities as null (JSON has no such numbers)."""
    a = np.asarray(a)
    if a.dtype.kind == "f":
        return np.where(np.isfinite(a), a, None).tolist()
    return a.tolist()


def _json(results, args):
    images = []
    for r in results:
        ev = r["evaluation"]
        item = {"image": r["image"], "pred": r["pred"], "target": r["target"]}
        item.update((k, _plain(getattr(ev, k)[0])) for k in _SCORES)
        item.update(seconds=r["seconds"], streamed=r["streamed"])
        if r["tiles"] is not None:
            item["tiles"] = {"tile_shape": list(args.tile)}
            item["tiles"].update((k, _plain(getattr(r["tiles"], k)[0])) for k in _SCORES)
        images.append(item)
    options = {k: getattr(args, k) for k in ("classes_axis", "from_probs", "pos_weight",
                                              "label_smoothing", "divergence", "tile",
                                              "backend", "threads")}
    return {"options": options, "images": images, "summary": _summary(results, args)}
