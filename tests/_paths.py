"""The code paths that large inputs or other backends take, forced at the small shapes of the
tests: the library chooses them at trace time from sizes and the backend (``jaxce._xla``)."""

import contextlib
from unittest import mock

from jaxce import _xla

ROW_CHUNKS = "row chunks"
FUSED_SOFT_PASS = "fused soft pass"


PICKED = None  # the path the library picks for the shapes at hand


@contextlib.contextmanager
def taken(path: str | None):
    """While tracing inside, the library takes ``path``, with the exponentials computed again
    in the backward pass (as above the sizes whose exponentials are kept), or (``None``) the
    one it picks:

    - ``"row chunks"``: one row a chunk, on every backend (the loop over chunks with its tail,
      which a large input takes where XLA would keep an array of its size);
    - ``"fused soft pass"``: the soft-label pass over whole rows that the CPU takes from
      ``FUSED_SOFT_MIN_ELEMENTS`` up (jaxlib 0.10.2 on).

    A function jitted outside must be traced inside (the patches act at trace time only)."""
    if path is PICKED:
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
        elif path == FUSED_SOFT_PASS:
            patch("backend", lambda: "cpu")
            patch("cpu_fuses_whole_rows", lambda: True)
            patch("FUSED_SOFT_MIN_ELEMENTS", 0)
        else:
            raise ValueError(f"unknown path {path!r}")
        yield
