"""`python -m flaxcnn summary NAME [--side N]`: the book's layer-by-layer shape print-out."""

import argparse
import sys

from flaxcnn import models, recipes


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m flaxcnn")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("summary", help="every top-level layer's output shape and parameters")
    p.add_argument("name", choices=models.names())
    p.add_argument("--side", type=int, help="input side (default: the book's for NAME)")
    args = parser.parse_args(argv)

    side = args.side or recipes.get(args.name).side
    model = models.create(args.name)
    try:
        rows = models.summary(model, side)
    except ValueError as e:
        parser.error(str(e))
    width = max(len(name) for name, _, _ in rows)
    print(f"{args.name} on a 1x{side}x{side}x1 input (NHWC)")
    for name, shape, n in rows:
        print(f"{name:<{width}}  output shape: {str(shape):<22} params: {n:>12,}")
    print(f"{'total':<{width}}  {'':<36}params: {sum(n for *_, n in rows):>12,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
