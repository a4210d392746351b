"""The `pyunlearn` command."""
from __future__ import annotations

import argparse
import sys


def _same_bits(xs, ys) -> bool:
    return all(x.dtype == y.dtype and torch_equal_bits(x, y) for x, y in zip(xs, ys))


def torch_equal_bits(x, y) -> bool:
    import torch

    return x.shape == y.shape and torch.equal(x.view(torch.uint8), y.view(torch.uint8))


def _selfcheck(args) -> int:
    """Prune and subtract one step of a tiny model natively and with the torch reference."""
    import torch

    from . import __version__, ops
    from .testing import random_step

    shapes = [("fc1.weight", (32, 64)), ("fc1.bias", (32,)), ("fc2.weight", (10, 32)), ("fc2.bias", (10,))]
    before, after = random_step(shapes, seed=0)
    k = ops.k_for([b.numel() for b in before], 0.1)
    row = ops.prune_topk([b.clone() for b in before], after, k)
    reference_row = ops.prune_topk_reference([b.clone() for b in before], after, k)
    params, reference_params = [a.clone() for a in after], [a.clone() for a in after]
    ops.subtract_sparse(params, row, k)
    ops.subtract_sparse_reference(reference_params, reference_row, k)

    checks = {
        "prune_topk": _same_bits(row, reference_row),
        "subtract_sparse": _same_bits(params, reference_params),
    }
    print(f"pyunlearn {__version__}, torch {torch.__version__}")
    print(f"kernels: {ops.backend()}")
    for name, ok in checks.items():
        print(f"  {name:<16} matches the torch reference bit for bit: {'yes' if ok else 'NO'}")
    return 0 if all(checks.values()) else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pyunlearn", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    selfcheck = commands.add_parser("selfcheck", help="say which kernels are native and check them on a tiny model")
    selfcheck.set_defaults(run=_selfcheck)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
