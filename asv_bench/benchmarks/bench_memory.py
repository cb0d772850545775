"""Peak memory: a fused call allocates the gradient and O(threads x block) more."""
import numpy as np

import fastsce

from .common import require

N = 1 << 24


class PeakMemory:
    params = [["c", "numba"]]
    param_names = ["backend"]

    def setup(self, backend):
        require(backend)
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal(N, dtype=np.float32)
        self.z = rng.random(N, dtype=np.float32)
        fastsce.sigmoid_cross_entropy(self.x[:10], self.z[:10], backend=backend)

    def peakmem_reference(self, backend):
        """The inputs alone: the baseline the other peakmem_ results add to."""
        return self.x, self.z

    def peakmem_mean_and_grad(self, backend):
        fastsce.sigmoid_cross_entropy(self.x, self.z, backend=backend)

    def peakmem_loss_only(self, backend):
        fastsce.sigmoid_cross_entropy(self.x, self.z, backend=backend, grad=False)
