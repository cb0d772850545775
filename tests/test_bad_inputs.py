"""Every row of tests/bad_inputs.py on every backend: the documented exception,
a message naming the argument, the inputs bitwise untouched, and `out`/`loss_out`
untouched too (after a target error found inside the fused pass: all NaN, as
the message says). Every `fastsce evaluate` row: its exit code, one line naming the
file or option, no output written. And README's table is the table's."""
import os
import re

import numpy as np
import pytest

import fastsce
from bad_inputs import CASES, CLI_CASES, operands, readme_now, readme_section
from conftest import require_backend
from fastsce.__main__ import main

SENTINEL = -1234.0  # exact in float16/32/64; no loss or gradient of these rows equals it
LOSSES = {"sigmoid": fastsce.sigmoid_cross_entropy, "softmax": fastsce.softmax_cross_entropy}
HUMAN_SIZE = re.compile(r"\d+(\.\d+)? [KMGTPE]iB")
FILLED = re.compile(r"(`\w+`(?: and `\w+`)?) held partial results and w\w+ filled with NaN")


def _sentinel_like(a):
    a = np.asarray(a)
    dtype = a.dtype if a.dtype.kind == "f" and a.dtype.isnative else np.dtype(np.float64)
    return np.full(a.shape, SENTINEL, dtype)


def _call_arguments(case, operands):
    """The row's arguments, with sentinel `out` / `loss_out` unless the row sets them."""
    kw = case.make(operands)
    x = np.asarray(kw["logits"])
    big = x.size > 2**30  # the memory rows: an output buffer would remove their allocation
    if "out" not in kw and kw.get("grad", True) is not False and not big:
        kw["out"] = _sentinel_like(x)
    if "loss_out" not in kw and kw.get("reduction") == "none" and not big:
        pixels = x.shape if case.loss == "sigmoid" else \
            x.shape[:1] + x.shape[2:] if x.ndim > 1 else ()
        kw["loss_out"] = _sentinel_like(np.empty(pixels, x.dtype if x.dtype.kind == "f" else
                                                 np.float64))
    return kw


def _snapshot(kw):
    """Bytes of every array argument that a failed call must leave as it was."""
    return {k: np.array(v, copy=True) for k, v in kw.items()
            if isinstance(v, np.ndarray) and v.size < 2**20}


@pytest.mark.parametrize("backend_name,case",
                         [(b, c) for c in CASES for b in c.backends],
                         ids=[f"{b}-{c.what}" for c in CASES for b in c.backends])
def test_bad_input(case, backend_name):
    require_backend(backend_name)
    kw = _call_arguments(case, operands())
    kw.setdefault("backend", backend_name)
    before = _snapshot(kw)
    with pytest.raises(case.error) as info:
        LOSSES[case.loss](**kw)
    err, msg = info.value, str(info.value)
    assert case.names in msg, f"message does not name {case.names}: {msg}"
    if case.error is MemoryError:
        assert HUMAN_SIZE.search(msg), f"no size in: {msg}"
    else:
        assert isinstance(err, fastsce.FastSCEError), type(err)
        assert not re.search(r"\barray\(\[", msg), f"array contents in: {msg}"
    filled = FILLED.search(msg)
    assert filled is None or case.error is fastsce.TargetRangeError, msg
    for name, saved in before.items():
        now = np.asarray(kw[name])
        if filled and f"`{name}`" in filled.group(1):
            assert np.isnan(now).all(), f"`{name}` is not all NaN: {msg}"
            continue
        assert now.tobytes() == saved.tobytes(), f"`{name}` was written by a failed call"


def test_same_error_on_every_backend():
    """Argument and target errors are raised by the shared layer: one message."""
    arrays = operands()
    for case in CASES:
        if case.error is MemoryError:
            continue
        messages = set()
        for name in ("numba", "c", "numpy"):
            if not fastsce.info()["backends"][name]["available"]:
                continue
            kw = case.make(arrays)
            kw.setdefault("backend", name)
            with pytest.raises(case.error) as info:
                LOSSES[case.loss](**kw)
            messages.add(str(info.value))
        assert len(messages) == 1, (case.what, messages)


def test_readme_table_is_generated_from_the_cases():
    assert readme_now() == readme_section(), (
        "README's 'Bad inputs' table differs from tests/bad_inputs.py; "
        "run: python tests/bad_inputs.py")


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.what for c in CLI_CASES])
def test_bad_command(case, tmp_path, capsys):
    args = case.make(tmp_path)
    outputs = []
    if "--csv" not in args:
        outputs += ["--csv", tmp_path / "r.csv"]
    outputs += ["--json", tmp_path / "r.json", "--save-maps", tmp_path / "maps"]
    argv = ["evaluate", *map(str, args), *map(str, outputs)]
    if case.usage:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        code = exit_info.value.code
    else:
        code = main(argv)
    _, err = capsys.readouterr()
    assert code == case.code, err
    assert case.names in err, err
    assert "Traceback" not in err
    if not case.usage:
        assert err.count("\n") == 1 and err.startswith("fastsce: error: "), err
    assert not (tmp_path / "r.csv").exists() and not (tmp_path / "r.json").exists()
    assert not (tmp_path / "maps").exists() or not os.listdir(tmp_path / "maps")
