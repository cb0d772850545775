"""fastsce.torch: values and gradients against PyTorch's own losses, gradcheck,
modules in a training step, errors, and that tensors are read without a copy."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import fastsce  # noqa: E402
import fastsce.torch as ft  # noqa: E402

DTYPES = [torch.float32, torch.float64]


def tol(dtype):
    return dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def value_and_grad(fn, x, upstream=None):
    """fn(leaf copy of x), and d(sum(upstream * loss))/dx."""
    x = leaf(x)
    loss = fn(x)
    loss.backward(torch.ones_like(loss) if upstream is None else upstream)
    return loss.detach(), x.grad


def assert_same_loss(ours, theirs, x, upstream=None, **kw):
    (a, ga), (b, gb) = value_and_grad(ours, x, upstream), value_and_grad(theirs, x, upstream)
    assert a.shape == b.shape and a.dtype == b.dtype == x.dtype
    torch.testing.assert_close(a, b, **kw)
    torch.testing.assert_close(ga, gb, **kw)


@pytest.fixture
def binary_case():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 5, 6, generator=g, dtype=torch.float64) * 4
    z = torch.rand(x.shape, generator=g, dtype=torch.float64)
    return x, z, g


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", ["plain", "pos_weight", "weight", "both"])
def test_matches_bce_with_logits(binary_case, backend, dtype, reduction, options):
    x, z, g = binary_case
    x, z = x.to(dtype), z.to(dtype)
    kw = {}
    if options in ("pos_weight", "both"):
        kw["pos_weight"] = torch.tensor([0.5, 2.0, 3.0], dtype=dtype).reshape(3, 1, 1)
    if options in ("weight", "both"):
        kw["weight"] = torch.rand(x.shape, generator=g, dtype=torch.float64).to(dtype)
    upstream = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype) \
        if reduction == "none" else torch.tensor(2.5, dtype=dtype)
    assert_same_loss(
        lambda t: ft.sigmoid_cross_entropy(t, z, reduction=reduction, backend=backend, **kw),
        lambda t: F.binary_cross_entropy_with_logits(t, z, reduction=reduction, **kw),
        x, upstream, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "dim=-1"])
def test_matches_cross_entropy_probabilities(backend, dtype, reduction, layout):
    g = torch.Generator().manual_seed(8)
    x = (torch.randn(2, 5, 4, 6, generator=g, dtype=torch.float64) * 4).to(dtype)
    p = torch.softmax(torch.randn(x.shape, generator=g, dtype=torch.float64), 1).to(dtype)
    cw = torch.tensor([0.5, 1.0, 2.0, 0.25, 3.0], dtype=dtype)
    upstream = torch.randn(2, 4, 6, generator=g, dtype=torch.float64).to(dtype) \
        if reduction == "none" else torch.tensor(0.75, dtype=dtype)
    dim = 1
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if layout == "dim=-1":  # NHWC tensors, the class axis last
        x, p, dim = x.movedim(1, -1).contiguous(), p.movedim(1, -1).contiguous(), -1
    for kw, theirs in [({}, {}), ({"class_weights": cw, "label_smoothing": 0.1},
                                  {"weight": cw, "label_smoothing": 0.1})]:
        def torch_loss(t):
            return F.cross_entropy(t.movedim(dim, 1), p.movedim(dim, 1), reduction=reduction,
                                   **theirs)

        assert_same_loss(
            lambda t: ft.softmax_cross_entropy(t, p, dim=dim, reduction=reduction,
                                               backend=backend, **kw),
            torch_loss, x, upstream, **tol(dtype))


def test_matches_cross_entropy_class_indices(backend):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, 4, (3, 5, 6), generator=g)
    labels[:, 0] = -100
    cw = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64)
    # "mean" over the non-ignored pixels agrees without class weights ...
    assert_same_loss(
        lambda t: ft.softmax_cross_entropy(t, labels, ignore_value=-100, backend=backend),
        lambda t: F.cross_entropy(t, labels), x, **tol(torch.float64))
    # ... and "sum" with them (torch's "mean" divides by the sum of the weights).
    assert_same_loss(
        lambda t: ft.softmax_cross_entropy(t, labels, ignore_value=-100, class_weights=cw,
                                           reduction="sum", backend=backend),
        lambda t: F.cross_entropy(t, labels, weight=cw, reduction="sum"), x,
        **tol(torch.float64))


GROUPINGS = [dict(reduction="none"), dict(reduction="mean"), dict(reduction="sum"),
             dict(reduction="mean", reduce_axes=(1, 2)), dict(reduction="sum", reduce_axes=0),
             dict(reduction="mean", tile_shape=(2, 4))]


@pytest.mark.parametrize("grouping", GROUPINGS, ids=lambda d: "-".join(map(str, d.values())))
def test_gradcheck_sigmoid(binary_case, fast_backend, grouping):
    x, z, g = binary_case
    mask = torch.rand(x.shape[1:], generator=g) > 0.2
    weight = torch.rand(x.shape, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda t: ft.sigmoid_cross_entropy(t, z, mask=mask, weight=weight, pos_weight=1.5,
                                           label_smoothing=0.1, backend=fast_backend,
                                           **grouping),
        (leaf(x),))


@pytest.mark.parametrize("grouping", GROUPINGS, ids=lambda d: "-".join(map(str, d.values())))
@pytest.mark.parametrize("target", ["soft", "labels"])
def test_gradcheck_softmax(fast_backend, grouping, target):
    g = torch.Generator().manual_seed(10)
    x = torch.randn(2, 4, 5, 7, generator=g, dtype=torch.float64) * 3
    z = torch.rand(x.shape, generator=g, dtype=torch.float64) if target == "soft" else \
        torch.randint(0, 4, (2, 5, 7), generator=g)
    mask = torch.rand(2, 5, 7, generator=g) > 0.2
    assert torch.autograd.gradcheck(
        lambda t: ft.softmax_cross_entropy(t, z, class_weights=[1.0, 2.0, 0.5, 1.5],
                                           mask=mask, label_smoothing=0.05,
                                           backend=fast_backend, **grouping),
        (leaf(x),))


def test_module_in_a_training_step():
    g = torch.Generator().manual_seed(11)
    images = torch.randn(2, 3, 8, 8, generator=g)
    z = torch.rand(2, 2, 8, 8, generator=g)
    mask = torch.rand(2, 1, 8, 8, generator=g) > 0.1
    torch.manual_seed(0)
    ours, theirs = torch.nn.Conv2d(3, 2, 1), torch.nn.Conv2d(3, 2, 1)
    theirs.load_state_dict(ours.state_dict())
    pos = torch.tensor([2.0, 0.5]).reshape(2, 1, 1)
    loss_fn = ft.SigmoidCrossEntropy(pos_weight=pos, reduction="sum")
    assert "pos_weight" in dict(loss_fn.named_buffers())
    loss = loss_fn(ours(images), z, mask=mask)
    loss.backward()
    want = F.binary_cross_entropy_with_logits(theirs(images), z, pos_weight=pos,
                                              weight=mask.float(), reduction="sum")
    want.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad)

    loss_fn = ft.SoftmaxCrossEntropy(class_weights=[1.0, 3.0]).double()
    assert loss_fn.class_weights.dtype == torch.float64  # a buffer: moved by .double()
    x = leaf(torch.randn(2, 2, 8, 8, generator=g, dtype=torch.float64))
    loss_fn(x, z.double()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="`weight` was given to the module and to forward"):
        ft.SigmoidCrossEntropy(weight=2.0)(x, z.double(), weight=3.0)


class Spy:
    """Records the arrays fastsce.torch hands to the NumPy API (its `_SIGMOID` or
    `_SOFTMAX`: the loss function for a new gradient buffer)."""

    def __init__(self, monkeypatch, name):
        self.calls = []
        real = getattr(ft, name)

        def spy(logits, targets, **kw):
            self.calls.append(dict(kw, logits=logits, targets=targets))
            return real(logits, targets, **kw)

        monkeypatch.setattr(ft, name, spy)


def test_tensors_are_read_and_written_in_place(monkeypatch):
    spy = Spy(monkeypatch, "_SIGMOID")
    base = torch.randn(4, 6, 10, dtype=torch.float32)
    x = base[:, 1:5, ::2].requires_grad_(True)      # strided, not contiguous
    z = torch.rand(4, 6, 10)[:, 1:5, ::2]
    loss = ft.sigmoid_cross_entropy(x, z, reduction="sum")
    call, = spy.calls
    assert np.shares_memory(call["logits"], base.numpy())
    assert np.shares_memory(call["targets"], z.numpy())
    saved, = loss.grad_fn.saved_tensors
    assert np.shares_memory(call["out"], saved.numpy())   # the kernel wrote autograd's tensor
    assert call["grad"] is True and call["num_threads"] == torch.get_num_threads()
    loss.backward()
    torch.testing.assert_close(x.grad, torch.sigmoid(x.detach()) - z)

    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    ft.softmax_cross_entropy(leaf(x), torch.rand(x.shape), reduction="sum")
    assert torch.empty_like(x).stride() == x.stride()  # the gradient keeps channels_last


def test_backward_twice_accumulates_without_touching_the_saved_gradient():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    z = torch.rand(3, 4, dtype=torch.float64)
    loss = ft.sigmoid_cross_entropy(x, z, reduction="sum")
    saved = loss.grad_fn.saved_tensors[0].clone()
    loss.backward(retain_graph=True)
    loss.backward(retain_graph=True)
    (2 * loss).backward(retain_graph=True)
    torch.testing.assert_close(x.grad, 4 * saved)
    torch.testing.assert_close(loss.grad_fn.saved_tensors[0], saved, rtol=0, atol=0)


def test_no_gradient_when_none_is_needed(monkeypatch):
    spy = Spy(monkeypatch, "_SOFTMAX")
    x = torch.randn(2, 3, 4, requires_grad=True)
    with torch.no_grad():
        loss = ft.softmax_cross_entropy(x, torch.randint(0, 3, (2, 4)))
    loss2 = ft.softmax_cross_entropy(x.detach(), torch.randint(0, 3, (2, 4)), num_threads=1)
    assert [c["grad"] for c in spy.calls] == [False, False]
    assert spy.calls[1]["num_threads"] == 1 and spy.calls[1]["axis"] == 1
    assert loss.grad_fn is None and loss2.grad_fn is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int64])
def test_unsupported_dtype_is_a_type_error(dtype):
    x = torch.zeros(2, 3, dtype=dtype)
    with pytest.raises(TypeError, match=r"`input` must be float32 or float64; got .*fallback"):
        ft.sigmoid_cross_entropy(x, torch.zeros(2, 3))


def test_unsupported_operands_name_the_argument():
    x, z = torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match=r"`input` must be a dense CPU tensor; got device=meta"):
        ft.softmax_cross_entropy(x.to("meta"), z)
    with pytest.raises(ValueError, match=r"`mask` must be a dense CPU tensor"):
        ft.softmax_cross_entropy(x, z, mask=torch.ones(2, 4, dtype=torch.bool, device="meta"))
    with pytest.raises(TypeError, match=r"`target` must not be bfloat16"):
        ft.sigmoid_cross_entropy(x, z.bfloat16())
    with pytest.raises(ValueError, match=r"`target` requires grad.*target.detach\(\)"):
        ft.sigmoid_cross_entropy(x, leaf(z))
    with pytest.raises(TypeError, match=r"`input` must be a torch.Tensor; got ndarray"):
        ft.sigmoid_cross_entropy(x.numpy(), z)
    with pytest.raises(ValueError, match="`fallback` must be None"):
        ft.sigmoid_cross_entropy(x, z, fallback="numpy")


def test_kernel_errors_use_torch_names():
    x = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match=r"`dim` must be an integer in \[-3, 2\] for input"):
        ft.softmax_cross_entropy(x, torch.zeros(2, 3, 4), dim=3)
    with pytest.raises(ValueError, match=r"`target` must broadcast to the shape of `input` \(2, 3, 4\); got target.shape=\(5,\)"):
        ft.sigmoid_cross_entropy(x, torch.zeros(5))
    with pytest.raises(ValueError, match=r"`target` must be probabilities.*check=False\.$"):
        ft.sigmoid_cross_entropy(leaf(x), torch.full((2, 3, 4), 2.0))


@pytest.mark.parametrize("grouping", GROUPINGS, ids=lambda d: "-".join(map(str, d.values())))
def test_torch_fallback_matches_the_kernels(grouping):
    """fallback="torch" (float16 input) and the PyTorch-ops code itself (float64) agree
    with the kernels; there autograd also differentiates the target."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 4, 5, 7, generator=g, dtype=torch.float64) * 3
    z = torch.rand(x.shape, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (2, 5, 7), generator=g)
    labels[0, 0] = 255
    mask = torch.rand(5, 7, generator=g) > 0.2
    cases = [
        (ft.sigmoid_cross_entropy, ft._torch_ops.sigmoid_cross_entropy, z,
         dict(pos_weight=2.0, weight=z[0, 0], mask=mask, label_smoothing=0.1)),
        (ft.sigmoid_cross_entropy, ft._torch_ops.sigmoid_cross_entropy, (z * 255).to(torch.uint8),
         dict(divergence=True, from_logits=False)),
        (ft.softmax_cross_entropy, ft._torch_ops.softmax_cross_entropy, z,
         dict(class_weights=[1.0, 2.0, 0.5, 1.5], mask=mask, divergence=True)),
        (ft.softmax_cross_entropy, ft._torch_ops.softmax_cross_entropy, labels,
         dict(ignore_value=255, label_smoothing=0.1, weight=z[:, 0])),
    ]
    for fast, ops, target, kw in cases:
        inp = torch.sigmoid(x) if kw.get("from_logits") is False else x
        assert_same_loss(lambda t: ops(t, target, **kw, **grouping),
                         lambda t: fast(t, target, **kw, **grouping), inp,
                         **tol(torch.float64))
        half, want = (fast(t, target, fallback="torch", **kw, **grouping) for t in
                      (inp.half(), inp.float()))
        assert half.dtype == torch.float16
        torch.testing.assert_close(half.float(), want, rtol=2e-2, atol=2e-2)
    soft = leaf(z)
    ft.sigmoid_cross_entropy(x, soft, fallback="torch").backward()
    torch.testing.assert_close(soft.grad, -x / x.numel())
    out = ft.softmax_cross_entropy(x.to("meta"), z.to("meta"), fallback="torch", check=False,
                                   **grouping)
    assert out.device.type == "meta"


def test_bad_target_raises_in_torch_names_without_buffers():
    x = torch.zeros(3, 4, requires_grad=True)
    z = torch.full((3, 4), 0.5)
    z[1, 2] = 1.5
    with pytest.raises(fastsce.TargetRangeError, match=r"`target` must be.*\(1, 2\)") as info:
        ft.sigmoid_cross_entropy(x, z)
    assert "filled with NaN" not in str(info.value)  # the gradient tensor was our own
