"""`python -m fastsce` (and the `fastsce` command).

`fastsce evaluate PRED TARGET` scores predicted masks against soft targets
(`_cli`); with no paths, and with no command at all, it evaluates a
built-in sample. `fastsce demo` compares the backends on that sample,
`fastsce info` prints what this machine offers, `fastsce bench` measures.
"""
import argparse
import json
import sys

import numpy as np

from . import _backends, _cli, info, sigmoid_cross_entropy
from ._bench import _median
from ._sample import soft_masks


def demo(args):
    targets, logits = soft_masks(args.images, args.size, seed=args.seed)
    n = logits.size
    print(f"sample: {args.images} soft-label masks of {args.size}x{args.size} "
          f"({n:,} pixels, float32 logits, soft borders, one wrong region each)")
    ref = sigmoid_cross_entropy(logits, targets, backend="numpy")
    per_image = sigmoid_cross_entropy(logits, targets, backend="numpy", reduction="none",
                                      grad=False).loss.reshape(args.images, -1).mean(axis=1)
    print("per-image mean loss: "
          + ", ".join(f"{v:.4f}" for v in per_image))
    print(f"\n{'backend':8} {'mean loss':>20} {'time (median)':>14} {'Gelem/s':>8} "
          f"{'max |grad - ref|':>17}")
    grad = np.empty_like(logits)
    for name in _backends.NAMES:
        record = _backends.BACKENDS[name]
        if not record.available:
            print(f"{name:8} unavailable: {record.reason}")
            continue

        def call(name=name):
            return sigmoid_cross_entropy(logits, targets, backend=name, out=grad,
                                         num_threads=args.threads)

        result = call()
        seconds = _median(call, 3 if name == "numpy" else args.repeat)
        err = float(np.max(np.abs(result.grad.astype(np.float64) - ref.grad)))
        print(f"{name:8} {result.loss:20.12f} {seconds * 1e3:11.2f} ms {n / seconds / 1e9:8.3f} "
              f"{err:17.3g}")
    state = info()
    print(f"\nthreads: {state['num_threads']}, OpenMP in C: {state['openmp']}, "
          f"C path: {state['backends']['c']['features'].get('cpu_path')}, "
          "auto backend: " + ", ".join(f"{k} {v}" for k, v in state["auto_resolves_to"].items()))
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fastsce", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    p_eval = _cli.add_parser(sub)
    p_demo = sub.add_parser("demo", help="time every backend on built-in sample data")
    p_demo.add_argument("--images", type=int, default=4, help="number of sample masks (default 4)")
    p_demo.add_argument("--size", type=int, default=1024, help="mask side in pixels (default 1024)")
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.add_argument("--repeat", type=int, default=7, help="timed repeats per backend")
    p_demo.add_argument("--threads", type=int, default=None, help="threads (default: all CPUs)")
    sub.add_parser("info", help="backends, why one is missing, threads, OpenMP, CPU path")
    p_bench = sub.add_parser("bench", help="fastsce vs NumPy, PyTorch, JAX and the memory roofline")
    p_bench.add_argument("workloads", nargs="*", help="W1 W1L W2 W3 W4 (default: all)")
    p_bench.add_argument("--scale", type=float, default=1.0,
                         help="size factor (1: 64M elements, (2, 21, 512, 512) maps)")
    p_bench.add_argument("--repeat", type=int, default=5, help="timed repeats (median)")
    p_bench.add_argument("--threads", type=int, default=None, help="the 'all threads' count")
    p_bench.add_argument("--no-peers", action="store_true", help="skip NumPy/PyTorch/JAX")
    p_bench.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.command is None:  # the main job: the built-in sample, evaluated
        return _cli.run(p_eval.parse_args([]), p_eval)
    if args.command == "evaluate":
        return _cli.run(args, p_eval)
    if args.command == "bench":
        from . import _bench

        return _bench.main(args)
    if args.command == "info":
        json.dump(info(), sys.stdout, indent=2, default=str)
        print()
        return 0
    return demo(args)


if __name__ == "__main__":
    sys.exit(main())
