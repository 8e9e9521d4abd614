"""``python -m jaxce``: train small digit classifiers with jaxce losses and print what they show.

See :func:`jaxce.demo.run_demo`. Needs the ``[examples]`` extra: ``pip install "jaxce[examples]"``.
"""

from __future__ import annotations

import argparse
import pathlib
from collections.abc import Callable, Sequence

MAX_SEED = 2**32 - 1  # scikit-learn's and numpy's seeds are 32-bit unsigned integers


def _int_in_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type`` accepting integers in ``[low, high]`` (no upper bound if ``None``)."""
    expected = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return parse


def _plot_path(text: str) -> str:
    """An argparse ``type`` for ``--plot``: a file matplotlib can write, in a writable folder.

    Checked before training, so that a typo does not cost a training run.
    """
    path = pathlib.Path(text)
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise argparse.ArgumentTypeError(
            "needs matplotlib: pip install 'jaxce[examples]'"
        ) from None
    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    suffix = path.suffix[1:].lower()
    if suffix not in formats:
        raise argparse.ArgumentTypeError(
            f"{text!r} must end in a suffix matplotlib can write ({', '.join(formats)})"
        )
    folder = path.parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"folder {str(folder)!r} of {text!r} does not exist")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, not a file")
    existed = path.exists()
    try:  # the one reliable test of writability: open it (append mode leaves a file as it is)
        with open(path, "ab"):
            pass
    except OSError as error:
        raise argparse.ArgumentTypeError(f"{text!r} cannot be written: {error.strerror}") from None
    if not existed:
        path.unlink()
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Parses the command line and runs the demo.

    Invalid arguments (``--epochs 0``, a negative ``--seed``, a ``--plot`` file in a missing
    folder or with a suffix matplotlib cannot write) end the program with exit status 2 and a
    message before anything is trained.

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
    parser.add_argument(
        "--epochs", type=_int_in_range(1), default=20, help="passes over the data (default 20)"
    )
    parser.add_argument(
        "--seed",
        type=_int_in_range(0, MAX_SEED),
        default=0,
        help=f"seed of split, init and shuffle, 0 to {MAX_SEED} (default 0)",
    )
    parser.add_argument(
        "--plot",
        metavar="OUT.png",
        type=_plot_path,
        help="write loss curves to this file (png, pdf, svg, ...) in an existing folder",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)

    try:
        from jaxce import demo
    except ImportError as error:  # flax, haiku, scikit-learn or tqdm not installed
        print(f"The demo needs the examples extra ({error}): pip install 'jaxce[examples]'")
        return 1
    demo.run_demo(epochs=args.epochs, seed=args.seed, plot=args.plot, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
