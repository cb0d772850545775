"""Cold start: import time, and a fresh process's first call (Numba's disk cache)."""


class Startup:
    params = [["c", "numba"]]
    param_names = ["backend"]
    timeout = 300

    def timeraw_import(self, backend):
        return "import fastsce"

    def timeraw_first_call(self, backend):
        return f"""
import numpy as np, fastsce
fastsce.sigmoid_cross_entropy(np.zeros(1000, np.float32), np.zeros(1000, np.float32),
                              backend={backend!r})
"""
