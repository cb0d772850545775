"""PyTorch losses on fastsce's fused kernels (``pip install "fastsce[torch]"``).

The forward pass runs the fused kernel on the CPU tensor's own memory (a
NumPy view: no copy) and computes the loss and its gradient in one pass,
writing the gradient into a fresh tensor that autograd saves; backward only
scales that gradient by the upstream gradient. Options are those of
:func:`fastsce.sigmoid_cross_entropy` / :func:`fastsce.softmax_cross_entropy`
with PyTorch's names for the arrays (``input``, ``target``, ``dim``); the
gradient plumbing (``grad``, ``grad_scale``, ``out``, ``loss_out``) is
autograd's. Only ``input`` gets a gradient: ``target``, ``weight``,
``pos_weight``, ``mask`` and ``class_weights`` are constants, and a tensor
among them that requires grad is an error (its gradient would be silently
lost). ``num_threads`` defaults to ``torch.get_num_threads()``.

Float32 and float64 CPU tensors are supported. Other devices or dtypes
(CUDA, float16, bfloat16) raise, or with ``fallback="torch"`` are computed
with PyTorch's own ops (see ``fastsce._torch_ops``).
"""
try:
    import torch
except ImportError as exc:  # the extra is optional: say how to get it
    raise ImportError(
        'fastsce.torch needs PyTorch; install it with: pip install "fastsce[torch]"'
    ) from exc

import re
from dataclasses import dataclass

from torch import nn
from torch.autograd.function import once_differentiable

from . import _api, _torch_ops
from ._errors import FastSCEError, FastSCETypeError, FastSCEValueError
from ._groups import Grouping

__all__ = ["SigmoidCrossEntropy", "SoftmaxCrossEntropy", "sigmoid_cross_entropy",
           "softmax_cross_entropy"]

_DTYPES = (torch.float32, torch.float64)
# The gradient goes into a fresh tensor: no one sees it if a target is bad.
_SIGMOID = _api.into_new_buffer(_api.sigmoid_cross_entropy)
_SOFTMAX = _api.into_new_buffer(_api.softmax_cross_entropy)
_OPERANDS = ("weight", "pos_weight", "mask", "class_weights")  # constants, as target


def sigmoid_cross_entropy(
    input, target, *, weight=None, pos_weight=None, mask=None, label_smoothing=0.0,
    divergence=False, from_logits=True, target_scale=None, ignore_value=None,
    reduction="mean", reduce_axes=None, tile_shape=None, check=True, backend=None,
    num_threads=None, fallback=None,
):
    r"""Binary (sigmoid) cross-entropy with soft targets, differentiable in ``input``.

    Parameters
    ----------
    input : Tensor of float32 or float64 on the CPU, any shape and strides
        Logits (probabilities with ``from_logits=False``); read in place.
    target : Tensor (float16/32/64, uint8 or uint16) broadcastable to ``input``
        Soft targets in [0, 1], or integer codes divided by ``target_scale``.
        No gradient flows to it.
    weight, pos_weight, mask, label_smoothing, divergence, from_logits, target_scale, ignore_value
        As in :func:`fastsce.sigmoid_cross_entropy` (tensors, arrays or numbers).
    reduction, reduce_axes, tile_shape, check, backend
        As in :func:`fastsce.sigmoid_cross_entropy`.
    num_threads : int, optional
        Default ``torch.get_num_threads()``.
    fallback : {None, "torch"}
        "torch": compute inputs fastsce cannot take (another device, float16,
        bfloat16, a target that requires grad) with PyTorch's ops instead of raising.

    Returns
    -------
    Tensor of ``input.dtype``
        0-d for a full "mean"/"sum"; the loss map of ``input.shape`` for "none";
        one loss per group with ``reduce_axes`` / ``tile_shape``.

    Notes
    -----
    ``F.binary_cross_entropy_with_logits(input, target, weight, pos_weight=...)``
    gives the same value and gradient where both are finite; fastsce also keeps
    tiny losses exact and returns 0 (not NaN) for confident, correct infinite logits.
    """
    options = dict(weight=weight, pos_weight=pos_weight, mask=mask,
                   label_smoothing=label_smoothing, divergence=divergence,
                   from_logits=from_logits, target_scale=target_scale,
                   ignore_value=ignore_value, reduction=reduction, reduce_axes=reduce_axes,
                   tile_shape=tile_shape, check=check, backend=backend,
                   num_threads=num_threads)
    return _loss(_SIGMOID, _torch_ops.sigmoid_cross_entropy, None,
                 input, target, options, fallback)


def softmax_cross_entropy(
    input, target, *, dim=1, class_weights=None, weight=None, mask=None, ignore_value=None,
    label_smoothing=0.0, divergence=False, from_logits=True, target_scale=None,
    reduction="mean", reduce_axes=None, tile_shape=None, check=True, backend=None,
    num_threads=None, fallback=None,
):
    r"""Multiclass (softmax) cross-entropy over ``dim``, differentiable in ``input``.

    Parameters
    ----------
    input : Tensor of float32 or float64 on the CPU, shape (..., C, ...)
        Logits with the classes along ``dim`` (NCHW, channels_last: read in place).
    target : Tensor
        Soft targets of ``input``'s shape (float, or uint8/uint16 codes), or
        integer class indices of the shape without ``dim``. No gradient flows to it.
    dim : int
        The class axis (``axis`` of :func:`fastsce.softmax_cross_entropy`).
    class_weights, weight, mask, ignore_value, label_smoothing, divergence, from_logits, target_scale
        As in :func:`fastsce.softmax_cross_entropy`.
    reduction, reduce_axes, tile_shape, check, backend, num_threads, fallback
        As in :func:`sigmoid_cross_entropy`; ``reduce_axes`` and ``tile_shape``
        name axes of the pixel shape (``input`` without ``dim``).

    Returns
    -------
    Tensor of ``input.dtype``
        0-d for a full reduction; the per-pixel loss for "none"; one loss per group.

    Notes
    -----
    With probability targets ``F.cross_entropy(input, target, weight=class_weights,
    label_smoothing=eps)`` gives the same value and gradient where both are finite.
    With class indices "mean" divides by the count of unmasked pixels, as
    everywhere in fastsce; PyTorch divides by the sum of the class weights of
    the pixels, which agrees only without ``class_weights``. Use ``ignore_value``
    for PyTorch's ``ignore_index`` (no label is ignored by default).
    """
    options = dict(class_weights=class_weights, weight=weight, mask=mask,
                   ignore_value=ignore_value, label_smoothing=label_smoothing,
                   divergence=divergence, from_logits=from_logits, target_scale=target_scale,
                   reduction=reduction, reduce_axes=reduce_axes, tile_shape=tile_shape,
                   check=check, backend=backend, num_threads=num_threads)
    return _loss(_SOFTMAX, _torch_ops.softmax_cross_entropy, dim,
                 input, target, options, fallback)


def _loss(kernel, torch_ops, dim, input, target, options, fallback):
    if fallback not in (None, "torch"):
        raise FastSCEValueError(f'`fallback` must be None or "torch"; got {fallback!r}')
    if not isinstance(input, torch.Tensor):
        raise FastSCETypeError(
            f"`input` must be a torch.Tensor; got {type(input).__name__} "
            "(NumPy arrays go to fastsce.sigmoid/softmax_cross_entropy)")
    operands = {name: options.pop(name) for name in _OPERANDS if name in options}
    problem = _unsupported(input, {"target": target, **operands})
    if problem is not None:
        if fallback != "torch":
            raise problem
        return torch_ops(input, target, **({} if dim is None else {"dim": dim}), **operands,
                         **options)
    if options["num_threads"] is None:
        options["num_threads"] = torch.get_num_threads()
    if dim is not None:
        options["axis"] = dim
    options.update((name, _numpy(value)) for name, value in operands.items())
    plan = _Plan(kernel=kernel, target=_numpy(target), options=options,
                 want_grad=input.requires_grad and torch.is_grad_enabled(), dim=dim)
    return _Fused.apply(input, plan)


def _unsupported(input, operands):
    """The error for a call fastsce cannot run itself (None if it can)."""
    hint = ' (or pass fallback="torch" to compute it with PyTorch\'s ops)'
    if input.dtype not in _DTYPES:
        return FastSCETypeError(
            f"`input` must be float32 or float64; got {input.dtype}. Convert with "
            f"input.float(){hint}")
    for name, value in [("input", input)] + list(operands.items()):
        if not isinstance(value, torch.Tensor):
            continue
        if value.device.type != "cpu" or value.layout != torch.strided:
            return FastSCEValueError(
                f"`{name}` must be a dense CPU tensor; got device={value.device}, "
                f"layout={value.layout}. Move it with .cpu(){hint}")
        if value.dtype == torch.bfloat16:
            return FastSCETypeError(f"`{name}` must not be bfloat16; convert with .float(){hint}")
        if name != "input" and value.requires_grad:
            return FastSCEValueError(
                f"`{name}` requires grad, but fastsce differentiates only `input`; "
                f"pass {name}.detach(){hint}")
    return None


def _numpy(value):
    """A NumPy view of a CPU tensor (no copy); anything else as it is."""
    return value.detach().numpy() if isinstance(value, torch.Tensor) else value


@dataclass
class _Plan:
    kernel: object        # _SIGMOID or _SOFTMAX
    target: object        # NumPy view of the target
    options: dict         # kernel keywords (NumPy views of the tensor options)
    want_grad: bool
    dim: object           # the class axis (softmax) or None
    pixel_shape: tuple = ()

    def chain(self, grad, upstream):
        """d(sum of upstream * loss)/d input: `grad` (the "sum"-style gradient of each
        returned loss) times `upstream` spread over the elements each loss collects."""
        reduction = self.options["reduction"]
        if reduction != "none" and bool((upstream == 1).all()):
            return grad  # loss.backward(): the saved gradient already is the answer
        grouping = Grouping(self.pixel_shape, self.options["reduce_axes"],
                            self.options["tile_shape"], reduction)
        g = upstream
        if grouping.axes is not None:
            for axis in sorted(grouping.axes):
                g = g.unsqueeze(axis)
        elif grouping.tile is not None:
            (th, tw), (H, W) = grouping.tile, self.pixel_shape[-2:]
            g = g.repeat_interleave(th, -2).repeat_interleave(tw, -1)[..., :H, :W]
        if self.dim is not None and g.dim():  # a 0-d upstream broadcasts as it is
            g = g.unsqueeze(self.dim)
        return grad * g


class _Fused(torch.autograd.Function):
    """The loss of `input` by one fused kernel call; the gradient is saved in forward."""

    @staticmethod
    def forward(ctx, input, plan):
        x = input.detach().numpy()
        # The gradient keeps the input's memory format (channels_last stays so).
        grad = torch.empty_like(input) if plan.want_grad else None
        try:
            loss, _ = plan.kernel(x, plan.target, grad=plan.want_grad, out=_numpy(grad),
                                  **plan.options)
        except FastSCEError as exc:
            raise type(exc)(_torch_names(str(exc))) from None
        if plan.dim is not None:  # validated by the kernel
            plan.dim %= x.ndim
        plan.pixel_shape = x.shape if plan.dim is None else \
            x.shape[:plan.dim] + x.shape[plan.dim + 1:]
        ctx.save_for_backward(grad)
        ctx.plan = plan
        if isinstance(loss, float):
            return torch.tensor(loss, dtype=input.dtype)
        # A loss map is in the input's dtype already (no copy); group losses are float64.
        return torch.from_numpy(loss).to(input.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, upstream):
        grad, = ctx.saved_tensors
        return ctx.plan.chain(grad, upstream), None


_NAMES = [(re.compile(r"\blogits\b"), "input"), (re.compile(r"\btargets\b"), "target"),
          (re.compile(r"`axis`"), "`dim`")]


def _torch_names(message):
    """A kernel error message in this API's argument names (input, target, dim)."""
    for pattern, name in _NAMES:
        message = pattern.sub(name, message)
    return message


class _Loss(nn.Module):
    """Holds a loss's options; tensors among them are buffers (moved by .to())."""

    _buffers_of = ()

    def __init__(self, function, options):
        super().__init__()
        self.function = function
        for name in self._buffers_of:
            value = options.pop(name)
            self.register_buffer(name, None if value is None else torch.as_tensor(value))
        self.options = options

    def forward(self, input, target, mask=None, weight=None):
        """The loss of ``input``; ``mask`` and ``weight`` for this batch only
        (``weight`` only if the module holds none)."""
        if weight is not None and getattr(self, "weight", None) is not None:
            raise FastSCEValueError(
                "`weight` was given to the module and to forward(); pass it once")
        tensors = {name: getattr(self, name) for name in self._buffers_of}
        if weight is not None:
            tensors["weight"] = weight
        return self.function(input, target, mask=mask, **tensors, **self.options)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


def _options(scope):
    return {k: v for k, v in scope.items() if k not in ("self", "__class__")}


class SigmoidCrossEntropy(_Loss):
    """:func:`sigmoid_cross_entropy` as a module: ``loss = SigmoidCrossEntropy(...)(input,
    target, mask=None, weight=None)``. ``weight`` and ``pos_weight`` are buffers."""

    _buffers_of = ("weight", "pos_weight")

    def __init__(self, *, weight=None, pos_weight=None, label_smoothing=0.0,
                 divergence=False, from_logits=True, target_scale=None, ignore_value=None,
                 reduction="mean", reduce_axes=None, tile_shape=None, check=True,
                 backend=None, num_threads=None, fallback=None):
        super().__init__(sigmoid_cross_entropy, _options(locals()))


class SoftmaxCrossEntropy(_Loss):
    """:func:`softmax_cross_entropy` as a module: ``loss = SoftmaxCrossEntropy(...)(input,
    target, mask=None, weight=None)``. ``class_weights`` and ``weight`` are buffers."""

    _buffers_of = ("class_weights", "weight")

    def __init__(self, *, dim=1, class_weights=None, weight=None, ignore_value=None,
                 label_smoothing=0.0, divergence=False, from_logits=True, target_scale=None,
                 reduction="mean", reduce_axes=None, tile_shape=None, check=True,
                 backend=None, num_threads=None, fallback=None):
        super().__init__(softmax_cross_entropy, _options(locals()))
