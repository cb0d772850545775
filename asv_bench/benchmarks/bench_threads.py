"""Thread scaling of the fused binary kernel (the thread count is a parameter)."""
import numpy as np

import fastsce

from .common import binary_data, require


class Threads:
    params = [["c", "numba"], [1, 2]]
    param_names = ["backend", "threads"]

    def setup(self, backend, threads):
        require(backend)
        self.x, self.z = binary_data(1 << 22, np.float32)
        self.out = np.empty_like(self.x)
        fastsce.sigmoid_cross_entropy(self.x, self.z, backend=backend, num_threads=threads)

    def time_mean_and_grad(self, backend, threads):
        fastsce.sigmoid_cross_entropy(self.x, self.z, backend=backend, out=self.out,
                                      num_threads=threads)
