"""Multiclass soft-label cross-entropy over NCHW and NHWC maps."""
import numpy as np

from .common import BACKENDS, runner, softmax_data


class SoftmaxLossAndGrad:
    params = [BACKENDS, ["NCHW", "NHWC"], ["float32"], [21, 150]]
    param_names = ["backend", "layout", "dtype", "classes"]
    timeout = 300

    def setup(self, backend, layout, dtype, classes):
        side = 256 if classes == 21 else 96
        shape, axis = ((2, classes, side, side), 1) if layout == "NCHW" else \
            ((2, side, side, classes), -1)
        x, z = softmax_data(shape, axis, np.dtype(dtype))
        self.fn = runner("softmax", backend, x, z, axis=axis)
        self.fn()

    def time_mean_and_grad(self, backend, layout, dtype, classes):
        self.fn()


class SoftmaxSmallCall:
    """One small image per call (a mask of a batch evaluated image by image):
    what a call costs beyond its arithmetic (argument handling, scratch)."""
    params = [BACKENDS]
    param_names = ["backend"]

    def setup(self, backend):
        x, z = softmax_data((1, 21, 64, 64), 1, np.dtype("float32"))
        self.fn = runner("softmax", backend, x, z, axis=1)
        self.fn()

    def time_small_call(self, backend):
        self.fn()
