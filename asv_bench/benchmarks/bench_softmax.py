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
