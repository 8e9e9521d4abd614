"""Counting the programs JAX compiles (``jax_log_compiles`` logs each one)."""

import contextlib
import logging

import jax


class Compilations(logging.Handler):
    """Counts the programs JAX compiles while it is installed on JAX's logger."""

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.count = 0

    def emit(self, record):
        if record.getMessage().startswith("Compiling"):
            self.count += 1


@contextlib.contextmanager
def counted():
    """``with counted() as compiled:`` ... ``compiled.count`` programs were compiled inside."""
    counter = Compilations()
    logger = logging.getLogger("jax")
    logger.addHandler(counter)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        with jax.log_compiles(True):
            yield counter
    finally:
        logger.removeHandler(counter)
        logger.setLevel(level)
