"""`fastsce.info()`: every backend's status and every choice made, observable."""
from . import _backends, _threads


def info():
    """What this machine offers: backends (and why one is missing), threads, OpenMP.

    Returns
    -------
    dict
        ``backends``: name -> {"available", "reason", "features"};
        ``default_backend``: the default name (FASTSCE_BACKEND or "auto");
        ``auto_resolves_to``: {"sigmoid": name, "softmax": name}, what "auto"
        picks for each kind of call; ``num_threads``: the
        default thread count; ``openmp``: whether the C kernels were built
        with OpenMP; ``numba_threading_layer`` (the layer started, or the one
        asked for before the first launch) and ``numba_threading_policy`` (what
        fastsce does about it, README "Threads, processes and fork");
        ``forked_after_openmp``: this process was forked after OpenMP ran, so
        kernels run on one thread; ``vectorized_math``.
    """
    backends = {}
    for name, record in _backends.BACKENDS.items():
        backends[name] = {
            "available": record.available,
            "reason": record.reason,
            "features": record.features(),
        }
    auto = {kind: next((n for n in order if backends[n]["available"]), None)
            for kind, order in _backends.AUTO_ORDER.items()}
    c = backends["c"]["features"]
    nb = backends["numba"]["features"]
    return {
        "backends": backends,
        "default_backend": _backends.default_name(),
        "auto_resolves_to": auto,
        "num_threads": _threads.resolve_threads(None),
        "openmp": bool(c.get("openmp", False)),
        "numba_threading_layer": nb.get("threading_layer"),
        "numba_threading_policy": nb.get("threading_policy"),
        "forked_after_openmp": _threads.forked_after_openmp(),
        "vectorized_math": {
            "c": c.get("vectorized_math"),
            "numba": nb.get("vectorized_math"),
        },
    }
