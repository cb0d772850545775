"""Binary soft-label cross-entropy: fastsce backends beside their peers."""
import numpy as np

from .common import BACKENDS, binary_data, runner


class SigmoidLossAndGrad:
    params = [BACKENDS, ["float32", "float64"], [1 << 16, 1 << 22]]
    param_names = ["backend", "dtype", "n"]

    def setup(self, backend, dtype, n):
        x, z = binary_data(n, np.dtype(dtype))
        self.fn = runner("binary", backend, x, z)
        self.fn()  # compile (Numba) / warm up before timing

    def time_mean_and_grad(self, backend, dtype, n):
        self.fn()


class SigmoidLossOnly:
    params = [BACKENDS, [1 << 22]]
    param_names = ["backend", "n"]

    def setup(self, backend, n):
        x, z = binary_data(n, np.float32)
        self.fn = runner("binary", backend, x, z, grad=False)
        self.fn()

    def time_loss_only(self, backend, n):
        self.fn()


class SigmoidUint8Targets:
    params = [BACKENDS, [1 << 22]]
    param_names = ["backend", "n"]

    def setup(self, backend, n):
        x, z = binary_data(n, np.float32, tdtype=np.uint8)
        self.fn = runner("binary", backend, x, z)
        self.fn()

    def time_uint8_targets(self, backend, n):
        self.fn()


class SigmoidThroughput:
    """Elements per second and fraction of the same-traffic roofline (2^24 f32)."""

    params = [["c", "numba"]]
    param_names = ["backend"]
    timeout = 300

    def setup(self, backend):
        from fastsce import _bench

        x, z = binary_data(1 << 24, np.float32)
        self.fn = runner("binary", backend, x, z)
        wl = _bench.Workload("asv", "", "binary", x.shape)
        self.roof = _bench._median(_bench._roofline_runner(wl, x, z, 1 << 10), 5)
        self.t = _bench._median(self.fn, 5)
        self.n = x.size

    def track_elements_per_second(self, backend):
        return self.n / self.t

    track_elements_per_second.unit = "elements/s"

    def track_roofline_fraction(self, backend):
        return self.roof / self.t

    track_roofline_fraction.unit = "fraction"
