"""The same losses written with PyTorch ops: ``fallback="torch"`` of `fastsce.torch`.

For tensors the kernels cannot take (CUDA, float16, bfloat16, a target that
requires grad). Autograd differentiates it, targets included. The maths and
options are fastsce's; edge values are PyTorch's (NaN, not 0, for confident
correct infinite logits; float32 tiny losses may round to 0). Imported only
by `fastsce.torch`, after torch.
"""
import math

import torch
import torch.nn.functional as F

from ._errors import FastSCEValueError, TargetRangeError
from ._groups import Grouping

_CODES = {torch.uint8: 255.0, torch.uint16: 65535.0}


def sigmoid_cross_entropy(input, target, *, weight=None, pos_weight=None, mask=None,
                          label_smoothing=0.0, divergence=False, from_logits=True,
                          target_scale=None, ignore_value=None, reduction="mean",
                          reduce_axes=None, tile_shape=None, check=True, **_):
    dtype = _compute(input)
    x = input.to(dtype)
    valid = _valid(mask, target, ignore_value, x.shape)
    z = _soft(target, target_scale, dtype, check, valid)
    z = z * (1 - label_smoothing) + label_smoothing / 2
    a = 1.0 if pos_weight is None else torch.as_tensor(pos_weight, dtype=dtype, device=x.device)
    if divergence and not (pos_weight is None or bool(torch.all(a == 1))):
        raise FastSCEValueError("`divergence=True` is defined only with pos_weight == 1")
    if from_logits:
        loss = F.binary_cross_entropy_with_logits(
            x, z.expand_as(x), reduction="none",
            pos_weight=None if pos_weight is None else a.expand_as(x))
    else:  # log clamped at -100 as BCELoss
        loss = -(a * z * x.log().clamp(min=-100) + (1 - z) * (-x).log1p().clamp(min=-100))
    if divergence:  # minus the target's own entropy
        loss = loss + torch.xlogy(z, z) + torch.xlogy(1 - z, 1 - z)
    return _reduce(loss, weight, valid, reduction, reduce_axes, tile_shape, input.dtype)


def softmax_cross_entropy(input, target, *, dim=1, class_weights=None, weight=None,
                          mask=None, ignore_value=None, label_smoothing=0.0,
                          divergence=False, from_logits=True, target_scale=None,
                          reduction="mean", reduce_axes=None, tile_shape=None, check=True,
                          **_):
    dtype = _compute(input)
    x = input.to(dtype)
    dim %= x.ndim
    C = x.shape[dim]
    pixel_shape = x.shape[:dim] + x.shape[dim + 1:]
    hard = not target.dtype.is_floating_point and target.shape != x.shape \
        and target.dim() == len(pixel_shape)  # class indices, as fastsce tells them
    valid = _valid(mask, target if hard else None, ignore_value, pixel_shape)
    if hard:
        labels = target.expand(pixel_shape)
        bad = ~((labels >= 0) & (labels < C)) & valid
        if check and bool(bad.any()):
            raise TargetRangeError(f"`target` must be class indices in [0, {C - 1}]; "
                                   f"found {int(bad.sum())} outside that range")
        z = F.one_hot(torch.where(bad | ~valid, 0, labels), C).movedim(-1, dim).to(dtype)
    else:
        z = _soft(target, target_scale, dtype, check, valid.unsqueeze(dim))
    z = z * (1 - label_smoothing) + label_smoothing / C
    logq = F.log_softmax(x, dim) if from_logits else x.log().clamp(min=-100)
    shape = [1] * x.ndim
    shape[dim] = C
    w = 1.0 if class_weights is None else \
        torch.as_tensor(class_weights, dtype=dtype, device=x.device).reshape(shape)
    terms = -w * z * logq
    if divergence:
        terms = terms + w * torch.xlogy(z, z)
    return _reduce(terms.sum(dim), weight, valid, reduction, reduce_axes, tile_shape,
                   input.dtype)


def _compute(input):
    if not input.dtype.is_floating_point:
        raise TypeError(f"`input` must be floating point; got {input.dtype}")
    # float16/bfloat16 are computed in float32 (SPEC §2), as fastsce does.
    return torch.float64 if input.dtype == torch.float64 else torch.float32


def _valid(mask, codes, ignore_value, shape):
    """Boolean map of the counted elements (pixels)."""
    valid = torch.ones((), dtype=torch.bool)
    if mask is not None:
        valid = torch.as_tensor(mask)
    if ignore_value is not None:
        valid = valid.to(codes.device) & (codes != ignore_value)
    return valid.expand(shape)


def _soft(target, scale, dtype, check, valid):
    z = target.to(dtype) / (scale or _CODES.get(target.dtype, 1.0))
    if check:
        bad = ~((z >= 0) & (z <= 1)) & valid.to(z.device)
        if bool(bad.any()):
            raise TargetRangeError(f"`target` must be probabilities in [0, 1]; found "
                                   f"{int(bad.sum())} value(s) outside that range or NaN")
    return z


def _reduce(loss, weight, valid, reduction, reduce_axes, tile_shape, dtype):
    """Weighted, masked loss map reduced as fastsce does (float64 sums)."""
    valid = valid.to(loss.device)
    if weight is not None:
        loss = loss * torch.as_tensor(weight, dtype=loss.dtype, device=loss.device)
    loss = torch.where(valid, loss, 0)
    grouping = Grouping(tuple(loss.shape), reduce_axes, tile_shape, reduction)
    if reduction == "none":
        return loss.to(dtype)
    loss, count = loss.double(), valid.expand(loss.shape).double()
    if grouping.tile is not None:
        loss, count = _tiles(loss, grouping.tile), _tiles(count, grouping.tile)
    else:
        axes = grouping.axes if grouping.axes is not None else tuple(range(loss.dim()))
        loss, count = loss.sum(axes), count.sum(axes)
    if reduction == "mean":
        loss = torch.where(count > 0, loss / count.clamp(min=1), math.nan)
    return loss.to(dtype)


def _tiles(a, tile):
    """Sums over tiles of the last two axes (edge tiles smaller: zero padded)."""
    (H, W), (th, tw) = a.shape[-2:], tile
    nh, nw = -(-H // th), -(-W // tw)
    a = F.pad(a, (0, nw * tw - W, 0, nh * th - H))
    return a.reshape(a.shape[:-2] + (nh, th, nw, tw)).sum((-3, -1))
