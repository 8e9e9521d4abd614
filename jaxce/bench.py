"""Benchmarks, run as ``python -m jaxce.bench <name>``; each benchmark is a subcommand.

``cross_entropy``: value and gradient of the mean integer-label softmax cross-entropy, jaxce
against optax and the memory-traffic floor (one fused pass reading the logits and writing an
array of their size), with each program's compiled temporary memory.

``linear``: forward + backward of the fused linear softmax cross-entropy against the unfused
losses (jaxce and optax on ``x @ w``) and the matmul floor (the three products no
implementation can avoid: ``x @ w``, ``g @ w.T``, ``x.T @ g``), side by side in one process:
compiled once, warmed up, then the median of ``--repeats`` runs, with each program's compiled
temporary memory (``compile().memory_analysis()``). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp


def _median_seconds(fn: Callable, args: Sequence, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # warm-up (compiled already)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _compiled(fn: Callable, args: Sequence):
    compiled = jax.jit(fn).lower(*args).compile()
    stats = compiled.memory_analysis()
    temp = None if stats is None else stats.temp_size_in_bytes
    return compiled, temp


def linear_programs(**loss_options) -> dict[str, tuple[Callable, str]]:
    """The programs compared by ``linear``: name -> (function of (x, w, labels, g), note)."""
    from jaxce._cross_entropy import softmax_cross_entropy_with_integer_labels
    from jaxce._linear import linear_softmax_cross_entropy

    def grads(loss):
        return jax.value_and_grad(loss, argnums=(0, 1))

    def fused(x, w, y, g):
        return grads(lambda x, w: linear_softmax_cross_entropy(x, w, y, **loss_options))(x, w)

    def unfused(x, w, y, g):
        def loss(x, w):
            return softmax_cross_entropy_with_integer_labels(x @ w, y, reduction="mean")

        return grads(loss)(x, w)

    def floor(x, w, y, g):
        return x @ w, g @ w.T, x.T @ g

    programs = {
        "fused (jaxce.linear_softmax_cross_entropy)": (fused, ""),
        "unfused jaxce (x @ w, then the loss)": (unfused, ""),
    }
    try:
        import optax

        def unfused_optax(x, w, y, g):
            def loss(x, w):
                logits = x @ w
                return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

            return grads(loss)(x, w)

        programs["unfused optax"] = (unfused_optax, "")
    except ImportError:  # pragma: no cover - optax is optional here
        pass
    programs["matmul floor (x@w, g@w.T, x.T@g)"] = (floor, "")
    return programs


def _measure(programs: dict[str, Callable], args: Sequence, repeats: int, skip=()) -> list:
    """``(name, seconds, ratio to the last program (the floor), temp bytes)`` per program.

    Each program is compiled, warmed up, and timed as the median of ``repeats`` runs; the
    floor is measured first.
    """
    rows = []
    floor_seconds = None
    for name, fn in reversed(list(programs.items())):  # the floor first
        if any(s in name for s in skip):
            continue
        compiled, temp = _compiled(fn, args)
        seconds = _median_seconds(compiled, args, repeats)
        floor_seconds = seconds if floor_seconds is None else floor_seconds
        rows.append((name, seconds, seconds / floor_seconds, temp))
    return list(reversed(rows))


def run_linear(n: int, d: int, v: int, dtype: str, repeats: int, skip: Sequence[str] = ()):
    """Measures every program of ``linear_programs`` and returns rows for the table."""
    dt = jnp.dtype(dtype)
    kx, kw, ky, kg = jax.random.split(jax.random.key(0), 4)
    x = (jax.random.normal(kx, (n, d), jnp.float32)).astype(dt)
    w = (jax.random.normal(kw, (d, v), jnp.float32) / d**0.5).astype(dt)
    y = jax.random.randint(ky, (n,), 0, v)
    g = (jax.random.normal(kg, (n, v), jnp.float32) / (n * v) ** 0.5).astype(dt)
    programs = {name: fn for name, (fn, _) in linear_programs().items()}
    return _measure(programs, (x, w, y, g), repeats, skip)


def cross_entropy_programs(**loss_options) -> dict[str, Callable]:
    """The programs compared by ``cross_entropy``: name -> function of (logits, labels)."""
    import optax

    from jaxce._cross_entropy import softmax_cross_entropy_with_integer_labels

    def jaxce_loss(logits, labels):
        def loss(z):
            return softmax_cross_entropy_with_integer_labels(
                z, labels, reduction="mean", **loss_options
            )

        return jax.value_and_grad(loss)(logits)

    def optax_loss(logits, labels):
        def loss(z):
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(z, labels))

        return jax.value_and_grad(loss)(logits)

    def floor(logits, labels):
        # Read the logits once and write an array of their size: any forward + backward does
        # at least this much memory traffic.
        return logits * jnp.asarray(2, logits.dtype)

    options = ", ".join(f"{k}={v}" for k, v in loss_options.items())
    return {
        f"jaxce ({options or 'no options'})": jaxce_loss,
        "optax (no options)": optax_loss,
        "memory-traffic floor (read + write the logits once)": floor,
    }


def run_cross_entropy(n: int, v: int, dtype: str, repeats: int, **loss_options):
    """Measures every program of ``cross_entropy_programs`` and returns rows for the table."""
    kx, ky = jax.random.split(jax.random.key(0))
    logits = (4 * jax.random.normal(kx, (n, v), jnp.float32)).astype(jnp.dtype(dtype))
    labels = jax.random.randint(ky, (n,), 0, v)
    return _measure(cross_entropy_programs(**loss_options), (logits, labels), repeats)


def _table(rows, header: str) -> str:
    lines = [
        header,
        "",
        "| program | time (s) | x floor | temp memory (MiB) |",
        "|---|---|---|---|",
    ]
    for name, seconds, ratio, temp in rows:
        mib = "n/a" if temp is None else f"{temp / 2**20:.1f}"
        lines.append(f"| {name} | {seconds:.3f} | {ratio:.2f} | {mib} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Parses the command line and runs the chosen benchmark.

    Args:
      argv: command-line arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
      The process exit status (0).
    """
    parser = argparse.ArgumentParser(prog="python -m jaxce.bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    linear = commands.add_parser(
        "linear", help="fused linear + softmax cross-entropy vs unfused and the matmul floor"
    )
    linear.add_argument("--n", type=int, default=4096, help="tokens (default 4096)")
    linear.add_argument("--d", type=int, default=512, help="hidden size (default 512)")
    linear.add_argument("--v", type=int, default=32768, help="vocabulary (default 32768)")
    linear.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    linear.add_argument("--repeats", type=int, default=3, help="timed runs (median)")
    linear.add_argument(
        "--skip", action="append", default=[], help="skip programs whose name contains this"
    )
    ce = commands.add_parser(
        "cross_entropy",
        help="integer-label softmax cross-entropy (value and gradient) vs optax and the"
        " memory-traffic floor",
    )
    ce.add_argument("--n", type=int, default=4096, help="examples (default 4096)")
    ce.add_argument("--v", type=int, default=32768, help="classes (default 32768)")
    ce.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    ce.add_argument("--repeats", type=int, default=5, help="timed runs (median)")
    ce.add_argument("--label-smoothing", type=float, default=0.0)
    ce.add_argument("--z-loss", type=float, default=0.0)
    ce.add_argument("--logit-soft-cap", type=float, default=None)
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    if args.command == "cross_entropy":
        options = {
            k: v
            for k, v in (
                ("label_smoothing", args.label_smoothing),
                ("z_loss", args.z_loss),
                ("logit_soft_cap", args.logit_soft_cap),
            )
            if v
        }
        rows = run_cross_entropy(args.n, args.v, args.dtype, args.repeats, **options)
        header = (
            f"N={args.n}, V={args.v}, {args.dtype}, value_and_grad of the mean loss,"
            f" {device.platform} ({device.device_kind}), median of {args.repeats}"
        )
        print(_table(rows, header))
    if args.command == "linear":
        rows = run_linear(args.n, args.d, args.v, args.dtype, args.repeats, args.skip)
        header = (
            f"N={args.n}, D={args.d}, V={args.v}, {args.dtype}, forward + backward"
            f" (value_and_grad wrt x and w), {device.platform} ({device.device_kind}),"
            f" median of {args.repeats}"
        )
        print(_table(rows, header))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
