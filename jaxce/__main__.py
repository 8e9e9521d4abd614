"""``python -m jaxce``: train small digit classifiers with jaxce losses and print what they show.

See :func:`jaxce.demo.run_demo`. Needs the ``[examples]`` extra: ``pip install "jaxce[examples]"``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Parses the command line and runs the demo.

    Args:
      argv: command-line arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
      The process exit status: 0 on success, 1 when an optional dependency is missing.
    """
    parser = argparse.ArgumentParser(
        prog="python -m jaxce",
        description=(
            "Train an MLP on scikit-learn's handwritten digits with jaxce's softmax cross-entropy, "
            "then compare a multi-label sigmoid head and the two-class case done both ways."
        ),
    )
    parser.add_argument("--epochs", type=int, default=20, help="passes over the data (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of split, init and shuffle")
    parser.add_argument("--plot", metavar="OUT.png", help="write loss curves to this PNG file")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")

    try:
        from jaxce import demo
    except ImportError as error:  # flax, haiku, scikit-learn or tqdm not installed
        print(f"The demo needs the examples extra ({error}): pip install 'jaxce[examples]'")
        return 1
    demo.run_demo(epochs=args.epochs, seed=args.seed, plot=args.plot, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
