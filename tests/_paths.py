"""The code paths that large inputs or other backends take, forced at the small shapes of the
tests: the library chooses them at trace time from sizes and the backend (``jaxce._xla``)."""

import contextlib
from unittest import mock

from jaxce import _xla

ROW_CHUNKS = "row chunks"
FUSED_PASSES = "fused passes"
SUB_ROWS = "sub-rows"


PICKED = None  # the path the library picks for the shapes at hand


def shortest_sub_rows(num_classes: int, dtype) -> int:
    """``_xla.row_blocks`` with sub-rows of each row's smallest divisor above 1 entries (of one
    entry where the length is prime): every sum over a row is then a sum of partial sums."""
    if num_classes < 2:
        return 1
    divisor = next(d for d in range(2, num_classes + 1) if num_classes % d == 0)
    return num_classes // divisor if divisor < num_classes else num_classes


@contextlib.contextmanager
def taken(path: str | None):
    """While tracing inside, the library takes ``path``, with the exponentials computed again
    in the backward pass (as above the sizes whose exponentials are kept), or (``None``) the
    one it picks:

    - ``"row chunks"``: one row a chunk, on every backend (the loop over chunks with its tail,
      which a large input takes where XLA would keep an array of its size);
    - ``"fused passes"``: the soft-label pass over whole rows that the CPU takes from
      ``FUSED_SOFT_MIN_ELEMENTS`` up (jaxlib 0.10.2 on), the integer-label smoothing's
      sums as if every class were admissible (``_rows.assumes_all_admissible``), as on CPU at
      any size, and the sums of elementwise losses in one fusion, from
      ``FUSED_SUM_MIN_ELEMENTS`` up (``_xla.sum_in_one_fusion``);
    - ``"sub-rows"``: rows reduced in sub-rows (``_loops.SubRows``), as the CPU reduces rows of
      more than ``CPU_ROW_BYTES`` (jaxlib 0.10.2 on, where the soft-label loss takes its fused
      pass at such sizes), here as short as each row's length allows
      (:func:`shortest_sub_rows`), with the exponentials kept where the library keeps them.

    A function jitted outside must be traced inside (the patches act at trace time only)."""
    if path is PICKED:
        yield
        return
    if path == SUB_ROWS:  # as on CPU, where the soft-label loss takes its fused pass there
        with contextlib.ExitStack() as stack:
            for name, value in (
                ("row_blocks", shortest_sub_rows),
                ("backend", lambda: "cpu"),
                ("cpu_fuses_whole_rows", lambda: True),
                ("FUSED_SOFT_MIN_ELEMENTS", 0),
            ):
                stack.enter_context(mock.patch.object(_xla, name, value))
            yield
        return
    with contextlib.ExitStack() as stack:

        def patch(name, value):
            stack.enter_context(mock.patch.object(_xla, name, value))

        patch("saves_exponentials", lambda *a, **k: False)
        if path == ROW_CHUNKS:
            patch("ROW_CHUNK_BYTES", dict.fromkeys(_xla.ROW_CHUNK_BYTES, 1))
            patch("reads_whole_rows", lambda: False)
            patch("cpu_fuses_whole_rows", lambda: False)
            patch("fuses_soft_loss", lambda x, y: False)
        elif path == FUSED_PASSES:
            patch("backend", lambda: "cpu")
            patch("cpu_fuses_whole_rows", lambda: True)
            patch("FUSED_SOFT_MIN_ELEMENTS", 0)
            patch("FUSED_SUM_MIN_ELEMENTS", 0)
        else:
            raise ValueError(f"unknown path {path!r}")
        yield


def fused_sums():
    """A spy on ``_xla.sum_in_one_fusion`` (the sums of elementwise losses taken in one fusion),
    as a context manager: its ``called`` and ``call_args_list`` tell what was traced inside."""
    return mock.patch.object(_xla, "sum_in_one_fusion", wraps=_xla.sum_in_one_fusion)
