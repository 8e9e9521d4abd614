"""Ways of writing a computation so that XLA compiles it without large temporaries.

The mathematics lives in ``_rows`` and ``_blocks``; this module holds the sizes and forms they
are computed in because of how XLA (above all its CPU backend) fuses operations, each next to
the memory test that fails without it. ``memory_analysis()`` of a compiled program is
deterministic, so these bounds are asserted, not hoped for:

* ``tests/test_memory.py``: ``jit(value_and_grad)`` of the integer-label loss needs a few
  row chunks of temporaries, whatever the number of rows (at most one bfloat16 ``[N, C]``
  buffer at the tested shape), for every option combination and on every JAX the package
  supports;
* ``tests/test_linear.py`` (the memory section): the fused loss stays within its block budget and
  never converts all of a bfloat16 ``w`` to float32.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import TypeVar

import jax
import jax.numpy as jnp
import jaxlib.version

from jaxce._layout import compute_dtype

T = TypeVar("T")

# Default chunk sizes of the fused loss per backend, measured with `python -m jaxce.bench linear`:
# (rows of the recompute strategy's blocks, its vocabulary chunk, the byte budget of one float32
# [token_chunk, V] block of the single-pass strategy). Accelerators have the bandwidth and the
# parallelism for bigger blocks; their single-pass block stays far below the [N, V] logits it
# replaces. Guarded by tests/test_linear.py::test_temporaries_at_most_64_mib and
# ::test_default_chunks_never_need_more_than_the_unfused_loss.
CHUNK_DEFAULTS = {
    "cpu": (1024, 2048, 24 * 2**20),
    "gpu": (4096, 8192, 512 * 2**20),
    "tpu": (4096, 8192, 512 * 2**20),
}


def backend() -> str:
    """The platform the computation is traced for (``"cpu"``, ``"gpu"``, ``"tpu"``): every
    choice of this module depends on it through here."""
    return jax.default_backend()


def chunk_defaults() -> tuple[int, int, int]:
    return CHUNK_DEFAULTS.get(backend(), CHUNK_DEFAULTS["gpu"])


# The fused loss's reduced losses with a float32 (or float64) w default to the single pass (6NDV
# FLOPs) on accelerators, where the products set the time, and to the two passes (8NDV) on CPU,
# where the single pass's thin products cost more than the fourth product. Measured on 2 cores of
# an Intel Xeon (2026-12-06; value_and_grad of the mean, one process, rounds alternating; two
# runs), the two passes' time over the single pass's: 256 x 64 x 1000 0.69-0.70x (2.0 against 0.26
# MiB of temporaries), 1024 x 256 x 8192 0.93x (12.0 against 9.4 MiB), 512 x 4096 x 8192 0.58-0.60x
# (25 against 9 MiB: the single pass's blocks of N/8 = 64 rows cut dw's update into products of 128
# columns), 4096 x 512 x 32768 0.92-0.93x (24.0 against 47.5 MiB), 8192 x 256 x 4096 1.02-1.05x (16
# against 34 MiB). Guarded by tests/test_linear.py::test_cpus_default_to_the_two_passes. The two
# passes' vocabulary chunks are cut where D is large on these backends only
# (_blocks.vocab_chunk_of_two_passes): measured there alone. Other backends take the GPUs' choices,
# as in chunk_defaults.
TWO_PASS_BACKENDS = ("cpu",)


def single_pass_by_default() -> bool:
    """Whether a reduced fused loss with a float32 or float64 ``w`` takes the single pass by
    default (not on ``TWO_PASS_BACKENDS``)."""
    return backend() not in TWO_PASS_BACKENDS


# The fused loss's single pass on GPUs takes each block of tokens with the whole vocabulary, where
# elsewhere it loops over vocabulary chunks inside the loop over tokens (``dw[:, cols] += x^T
# dz[:, cols]``). There the inner loop costs time (every iteration is kernel launches and a round
# trip of the loop's predicate to the host) and no memory: measured on an H200, value_and_grad in
# float32 with the default token chunks, whole vocabulary against the vocabulary chunk of
# CHUNK_DEFAULTS: 1024 x 256 x 8192 2.02 -> 0.71 ms (11.3 -> 8.3 MiB of temporaries), 4096 x 512 x
# 32768 6.28 -> 3.71 ms (193 -> 129 MiB), 16384 x 4096 x 131072 265 -> 196 ms (1232 -> 1040 MiB;
# the unfused loss 194 ms, the three products alone 178 ms). TPUs keep the chunks (not measured).
# Guarded by tests/test_linear.py::test_gpus_take_the_whole_vocabulary_in_the_single_pass.
WHOLE_VOCAB_BACKENDS = ("gpu",)


def whole_vocab_single_pass() -> bool:
    """Whether the fused loss's single pass takes the whole vocabulary in each block."""
    return backend() in WHOLE_VOCAB_BACKENDS


# The row statistics of the plain and sharded losses are reduced a chunk of rows at a time
# (_rows.row_stats): whatever XLA keeps while reducing a chunk (a float32 copy of it,
# exp(z - max), the capped logits) is at most a few chunks, whatever the compiler version
# fuses. On CPU a chunk is small enough to stay in cache between the max and the sum, so the
# logits are read from memory once; accelerators fuse the reductions and take large chunks.
# Guarded by tests/test_memory.py (a bound independent of the number of rows).
ROW_CHUNK_BYTES = {"cpu": 2**20, "gpu": 256 * 2**20, "tpu": 256 * 2**20}

# On GPUs XLA fuses a row reduction with the elementwise work that feeds it, and for some
# computations keeps nothing of the array's size when it reads the whole array: there a loop
# over row chunks only costs time (each iteration is more kernel launches and a round trip of
# the loop's predicate to the host). Measured on an H200 (value_and_grad at 4096 x 32768 and
# 8192 x 131072, float32 and bfloat16; speed relative to optax's in the same rounds, whole
# rows against 256 MiB chunks): the integer-label statistics without soft cap or smoothing,
# 0.86-0.94x -> 0.96-1.06x, temporaries at most 144 KiB; the soft-label statistics without
# smoothing, class weights or mask, 0.78-0.95x -> 0.95-1.01x, at most 16 MiB; float32
# elementwise sums (sigmoid BCE), 1.39-1.53x -> 1.80-2.11x, at most 257 KiB. Label smoothing
# without a soft cap too (2026-12-04, [8192, 131072] and [4096, 32768], alone, with class weights,
# with z-loss and class weights): float32 0.79-0.99x -> 1.02-1.27x, bfloat16 0.66-1.12x ->
# 0.88-1.54x, its four row sums one fusion beside the max's; XLA's partial sums of long rows grow
# with the rows there, 1-2 KiB a row (16-33 MiB at 16384 rows of 32768-131072 classes, 0.4% of
# the float32 logits). (The options' figures are relative to optax's program of that day, which
# smoothed one-hot labels: the comparisons between chunks and whole rows are what they measure.)
# Not so with a soft cap (every option on, bfloat16 [8192, 131072]: 4 GiB of
# temporaries, the capped logits written out) or for a bfloat16 elementwise sum whose derivative
# shares an exponential with it (4 GiB, see ``reads_whole_rows``): those keep their chunks, as
# TPUs do (not measured). With a soft cap and smoothing, XLA writes the capped logits out (in
# the max's kernel, which reads the same logits) for the sums, two of which read them. Nothing
# tried on the H200 on 2026-12-04 changed that (every option, float32 [8192, 131072], speed
# relative to optax's from 0.78-0.80x): the four sums as one reduction, 0.80x; an optimization
# barrier after the max, 0.65x (the capped logits get a kernel of their own); the cap's tanh
# built from exp(-2|u|) and a polynomial, operations XLA repeats in each reader, 0.80x; the max
# and the sums as one online-softmax reduction, 0.70x (XLA's GPU code for a reduction of several
# values with a rescaling combiner is bound by its arithmetic: float32 max and sum 1.80 ms
# against 0.96 + 0.95 ms as two reductions). Guarded by
# tests/test_memory.py::test_gpus_read_whole_rows_where_xla_fuses_them.
WHOLE_ROWS_BACKENDS = ("gpu",)


def reads_whole_rows() -> bool:
    """Whether the backend reads a reduction that XLA fuses whole in one piece.

    There ``value_and_grad`` of an elementwise loss's sum is one multi-output fusion that reads
    the logits once, writing the gradient as it sums the loss, unless the loss and its
    derivative share an exponential: then XLA's GPU compiler (JAX 0.11) writes it out as a
    float32 array for bfloat16 logits. The sigmoid BCE's derivative takes ``sigmoid(x)`` from
    its own exponential there (``lax.logistic``), not from the loss's ``exp(-|x|)``. Measured on
    an H200, bfloat16, whole rows against 256 MiB row chunks with the shared exponential:
    [16384, 4096] 2.04x -> 1.55x the floor (256 MiB -> 32 KiB of temporaries: one chunk held
    the array too), [4096, 32768] 2.31x -> 2.18x, [8192, 131072] 2.10x -> 1.75x (256 KiB);
    float32, already one pass, 1.10-1.41x the floor either way (within that machine's noise).
    On CPU, whose reductions never fuse their producers, the shared exponential is cheaper
    (float32 [256, 10]: 1.3-1.7x the time with ``lax.logistic``)."""
    return backend() in WHOLE_ROWS_BACKENDS


# On CPU, XLA (from jaxlib 0.10.2 on; 0.8.2-0.10.1 keep a float32 copy of the logits) also fuses
# the integer-label statistics (the max and the sum of exponentials, with z-loss, class weights or
# ignore_index) whole for float32, float64 and bfloat16 logits, keeping nothing of the array's
# size, where their 1 MiB row chunks each cost a loop iteration and a chunk's temporary. That is
# the loss without its gradient (an evaluation step; value_and_grad keeps the exponentials
# instead, see KEPT_BYTES). Measured, the loss alone, chunks against whole rows against optax,
# float32: [1024, 1000] 0.97 / 0.51 / 0.48 ms, [4096, 4096] 9.5 / 7.7 / 7.6 ms, [4096, 32768] 75 /
# 70 / 70 ms (ignore_index: 108 / 67 / 67 ms), no temporaries (1 MiB with chunks); float64 [1024,
# 1000] 1.66 / 1.08 / 1.06 ms. bfloat16 logits are converted for the sum inside the fusion only
# when that conversion is a value of its own (``unshared``), else XLA keeps a float32 copy (64 MiB
# at [4096, 4096], 1.5x the time of the chunks); so, against optax's loss in the same run, whole
# rows 1.60x / 1.85x / 1.97x / 1.95x at [1024, 1000] / [2048, 8192] / [4096, 4096] / [16384,
# 4096], chunks 0.80x / 1.12x / 1.28x / 1.36x. Not so for float16 (which XLA's CPU fusions do not
# take), for smoothing over the admissible classes or for elementwise sums (128 MiB at [4096,
# 4096] float32, 3.5x the time): those keep their chunks (smoothing of float32 and float64 logits
# without a mask, and without a soft cap or with one given as a number, first takes its sums as
# if every class were admissible: _rows.assumes_all_admissible).
# Guarded by
# tests/test_memory.py::test_the_loss_alone_reads_whole_rows_on_cpu, on the oldest and the
# newest JAX that CI installs.
CPU_WHOLE_ROWS_JAXLIB = (0, 10, 2)


def cpu_fuses_whole_rows() -> bool:
    """Whether this jaxlib's CPU compiler fuses the integer-label statistics whole."""
    numbers = re.findall(r"\d+", jaxlib.version.__version__)[:3]
    return tuple(int(n) for n in numbers) >= CPU_WHOLE_ROWS_JAXLIB


# The dtypes whose elementwise arithmetic and conversions XLA's CPU compiler fuses into its
# reductions (from jaxlib 0.10.2 on).
CPU_FUSED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float64)


def fusible_on_cpu(x: jax.Array) -> bool:
    """Whether XLA's CPU compiler can fuse a reduction of ``x`` (and its conversion) whole."""
    return cpu_fuses_whole_rows() and x.dtype in CPU_FUSED_DTYPES


def unshared(x: jax.Array) -> jax.Array:
    """``x``, as a value of its own on CPU where it is narrower than its compute dtype: its
    float32 conversion, read by one reduction, then stays inside that reduction's fusion, where a
    conversion shared with another computation that reads ``x`` (XLA merges equal ones) would be
    kept as a whole float32 array. An optimization barrier: no copy, no arithmetic."""
    if backend() == "cpu" and not computes_in_place(x):
        return jax.lax.optimization_barrier(x)
    return x


# XLA's CPU compiler (from jaxlib 0.10.2, its YNNPACK fusions) reduces a row of more than 128 KiB
# of the compute dtype several times slower than shorter ones: measured on 2^27 float32 entries,
# sum(exp(z)) over rows of 32768 in 42 ms, of 32769 in 290 ms, of 131072 in 289 ms (jaxlib 0.12:
# 40, 278 and 110 ms), their max 23 against 40 ms; bfloat16 16 ms against 148 ms beyond 32768
# entries; float64 (2^26) 43 ms against 295 ms beyond 16384. (jaxlib 0.8.2 takes 250 ms at any
# length.) So there a longer row is reduced as ``blocks`` sub-rows of at most that size, each one
# whole row of a view ``[rows * blocks, C / blocks]`` of the array, and the sub-rows' results are
# merged per row (``_loops.SubRows``). The view is behind an optimization barrier: a reshape
# alone is moved by XLA past the elementwise work, which then runs on the long rows again (163
# ms). The integer-label loss alone of float32 [1024, 131072] then takes 66 ms instead of 357 ms
# (optax's 335-349 ms), its value_and_grad 200-204 ms instead of 236-241 ms (optax's 232 ms); the
# soft-label loss alone 118 ms instead of 662 ms (optax's 452 ms), value_and_grad 361 ms instead
# of 917 ms (optax's 497 ms). In the loops over row chunks (the integer-label loss with every
# option, bfloat16 value_and_grad), where each chunk's sub-row sums are merged in kernels of their
# own at every iteration: 0.87-0.92x the time of the loss alone with every option, 1.04-1.07x its
# float32 value_and_grad, 0.87-1.0x bfloat16 value_and_grad. Not in the soft-label loss's row
# chunks (with options), which took 1.05-1.2x the time in sub-rows, nor in the reverse-mode rules
# of log_softmax and softmax, whose sum of the cotangent took 1.7-3x the time. A row with no
# divisor in [MIN_SUB_ROW, the limit] (a prime number of classes) is reduced whole. Guarded by
# tests/test_memory.py::test_long_rows_are_reduced_in_sub_rows_on_cpu.
CPU_ROW_BYTES = 128 * 2**10
MIN_SUB_ROW = 128


def row_blocks(num_classes: int, dtype) -> int:
    """The number of equal sub-rows a row of ``num_classes`` entries of ``dtype`` is reduced
    in: the fewest whose length divides the row, is at most ``CPU_ROW_BYTES`` of the compute
    dtype and at least ``MIN_SUB_ROW`` entries, on CPU from jaxlib 0.10.2 in a process with one
    device; else 1. With more, XLA's partitioner may split the class axis over devices, and the
    view would gather the logits onto each (as ``_loops.partitionable``;
    tests/_sharded_checks.py, ``plain_jit_on_automatic_axes_moves_only_rows``)."""
    longest = CPU_ROW_BYTES // jnp.dtype(compute_dtype(dtype)).itemsize
    if num_classes <= longest or backend() != "cpu" or not cpu_fuses_whole_rows():
        return 1
    if jax.device_count() > 1:
        return 1
    for blocks in range(-(-num_classes // longest), num_classes // MIN_SUB_ROW + 1):
        if num_classes % blocks == 0:
            return blocks
    return 1


# The soft-label loss alone (no derivative) without options, on CPU from jaxlib 0.10.2: XLA fuses
# a reduction with its producers whole (into a YNNPACK graph) when they are arithmetic, exp, log,
# min, max and conversions, with no comparison or select, for float32, bfloat16 and float64. The
# loss written so (_cross_entropy._fusible_soft_rows) reads whole rows and keeps only per-row
# numbers, where its row chunks ran at 0.36-0.72x optax's speed. Measured, the loss alone against
# optax's in the same run, float32 / bfloat16: [1024, 1000] 1.12x / 1.39x, [2048, 8192] 1.43x /
# 1.72x (optax keeps 64 MiB there), [4096, 4096] 0.92x / 0.88x, [16384, 4096] 0.99x / 0.88x;
# from CPU_WHOLE_PASS_ROWS rows on, with its two sums sharing x - shift, 0.99-1.00x at
# [16384, 4096] and [4096, 32768] (run alone, 15 rounds).
# Rows that need the select of 0 log 0 = 0 (a zero target on a -inf logit) come out NaN and the
# batch is computed again by an exact pass over whole rows, also without a select per entry
# (_cross_entropy._fusible_exact_soft_rows), whose branch the compiled program holds. Where that
# branch was the row chunks, they were most of the program's compile time (loss alone, float32
# [4096, 4096], against optax's in the same run: 417-481 ms with the chunks, 140-235 ms with the
# exact pass, optax 56-72 ms) and its temporaries (2 MiB, now 64 KiB at that shape). The exact pass
# does about four times the operations per entry and XLA splits it into four reductions, each
# reading the logits or the targets again: a batch with 100 -inf columns at float32 [4096, 4096]
# took 53-75 ms, 40-53 ms with the chunks (in the same rounds), optax's loss 18 ms (NaN there: it
# has no 0 log 0 = 0); passing such a mask as ``where`` takes the chunks directly. The derivative's
# rows (below) compute the exact pass from the fused pass's row sums, in one more reduction
# (_cross_entropy._fused_else_exact). Not float16
# (which XLA's CPU fusions do not take: a float32 copy) and not on accelerators (a branch on a
# device value waits for the device there), and not below FUSED_SOFT_MIN_ELEMENTS logits, which XLA
# leaves to its own fusions: there the pass and the test for NaN rows only add kernels (float32
# [256, 10]: 37 µs against 28 µs in chunks and 27 µs for optax's loss; [64, 100] a tie, [256, 256]
# 167 against 242 µs). At [256, 10] either way the row sums are one loop fusion whose operations
# outnumber its bytes (about 27.5 K to 22.5 K), which XLA's CPU cost model (ParallelTaskAssigner)
# splits over the cores: one call at a time, 90 µs against optax's 34 µs. Not split would take at
# most about six operations per entry there (it has nine, the 0 log 0 select and the halved gaps
# among them). Guarded by
# tests/test_memory.py::test_the_soft_label_loss_alone_reads_whole_rows_on_cpu.
# The derivative's forward pass (the row statistics its backward pass reads: the shift, the log-sum
# and the targets' mass) takes the same pass for float32 and float64 logits where their exponentials
# are not kept (above SOFT_KEPT_BYTES), where the row chunks ran at 0.81-1.03x optax's speed:
# value_and_grad, float32, in one run against the chunks / optax, [2048, 8192] 1.08x / 1.53x, [4096,
# 4096] 1.07x / 1.08x, [16384, 4096] 1.37x / 1.11x, [4096, 32768] 1.14x / 1.10x, with the same
# temporaries (2 MiB then; 96-384 KiB at the benchmark's shapes now that the branch it holds for NaN
# rows is the exact pass, not the chunks). Not for bfloat16 logits: there XLA keeps float32 copies
# beside the backward pass (512 MiB at [16384, 4096];
# tests/test_memory.py::test_temporaries_do_not_grow_with_the_rows).
FUSED_SOFT_MIN_ELEMENTS = 8192


# The sum of an elementwise loss (sigmoid BCE) on CPU, from jaxlib 0.10.2, written without a
# comparison or a select (_autodiff.elementwise's ``terms``): XLA fuses it whole with its sum into
# one YNNPACK kernel, where its row chunks were a loop over such kernels. value_and_grad of the
# mean took less: measured on 2 cores of an Intel Xeon (2026-12-06; one process, rounds
# alternating, 15 rounds), the fused sum's time over the chunks', float32: [512, 512] 0.98x,
# [1024, 1000] 0.73-0.80x, [2048, 8192] 0.88x, [4096, 4096] 0.90-0.96x, [16384, 4096] 0.95x;
# bfloat16: [1024, 1000] 0.77x, [4096, 4096] 0.83x. Below FUSED_SUM_MIN_ELEMENTS entries it took
# 1.09x ([64, 128], [256, 256]), and there the chunks stay. Where the sum is not finite (an
# infinite logit, NaN) the batch takes the same sum of terms exact at infinite logits
# (_binary._sigmoid_bce_terms with ``big``), one fusion too, in a branch. Lowering and compiling
# value_and_grad took 77 and 79 ms at float32 [1024, 1000] and [4096, 4096] (optax's 91 and
# 92 ms), where with a branch to the row chunks it took 147 and 140 ms, and with the exact terms
# alone, no branch, 55 and 61 ms; in bfloat16 84 and 92 ms (optax's 132 and 130 ms; the chunks
# 203 and 182 ms). The exact terms cost the loss alone 1.24x its time (float32 [4096, 4096]: 20.9
# against 16.8 ms), the branch nothing measured (value_and_grad 52.1 against 55.4 ms
# without a branch, 54.0 ms with the chunks; one run, 2026-12-06, 11 rounds).
# The inputs and the constants are values of their own (an optimization barrier): with a literal
# 1 XLA merged its broadcast with the derivative's and kept it as an array (128 MiB at float32
# [4096, 4096]); a conversion of narrow inputs shared with the derivative would be kept so too.
# Not for float16 (not fused: a float32 copy). Guarded by
# tests/test_memory.py::test_elementwise_sums_keep_no_array_of_their_size.
FUSED_SUM_MIN_ELEMENTS = 2**18


def fuses_sum(args: tuple, shape: tuple[int, ...]) -> bool:
    """Whether the sum of an elementwise loss of ``args`` (arrays of ``shape`` or broadcast to
    it, scalars, None) is taken whole by :func:`sum_in_one_fusion`."""
    arrays = [a for a in args if a is not None and jnp.ndim(a) > 0]
    return (
        backend() == "cpu"
        and math.prod(shape) >= FUSED_SUM_MIN_ELEMENTS
        and all(fusible_on_cpu(a) for a in arrays)
    )


def sum_in_one_fusion(
    terms: Callable[..., jax.Array], args: tuple, dtype, infinite: bool = False
) -> jax.Array:
    """``sum(terms(*args, zero, one))``, or with ``infinite`` ``sum(terms(*args, zero, one,
    big))`` (``big``: the largest finite number), ``args`` and the ``dtype`` scalars behind an
    optimization barrier (see FUSED_SUM_MIN_ELEMENTS): ``terms`` takes its constants from
    them."""
    constants = [jnp.zeros((), dtype), jnp.ones((), dtype)]
    if infinite:
        constants.append(jnp.asarray(jnp.finfo(dtype).max, dtype))
    *args, constants = jax.lax.optimization_barrier((*args, tuple(constants)))
    return jnp.sum(terms(*args, *constants))


# From this many rows on (jaxlib 0.10.2 to 0.12), XLA's CPU compiler makes the soft-label loss
# alone's fused pass (_cross_entropy._fusible_soft_rows) one fusion, with the log between its two
# reductions; below, the log is a kernel of its own and the reductions two fusions, between which
# anything of the logits' size that both read is kept as an array (measured at 4095 and 4096 rows,
# of 10 to 32768 classes, and at [2, 2048, 512]). Guarded by
# tests/test_memory.py::test_the_soft_label_loss_alone_reads_whole_rows_on_cpu.
CPU_WHOLE_PASS_ROWS = 4096


def fuses_soft_pass_whole(rows: int) -> bool:
    """Whether the fused soft-label pass over ``rows`` rows is one fusion on CPU (see
    CPU_WHOLE_PASS_ROWS): its two sums may then share their operands."""
    return rows >= CPU_WHOLE_PASS_ROWS


def fuses_soft_loss(x: jax.Array, y: jax.Array) -> bool:
    """Whether the soft-label loss alone of logits ``x`` and labels ``y`` is one fused pass
    (``_cross_entropy._fusible_soft_rows``) rather than row chunks."""
    return (
        backend() == "cpu"
        and fusible_on_cpu(x)
        and y.dtype in CPU_FUSED_DTYPES
        and x.shape[-1] > 0
        and x.size >= FUSED_SOFT_MIN_ELEMENTS
    )


def fuses_soft_rows(x: jax.Array, y: jax.Array) -> bool:
    """Whether the forward pass of the soft-label loss's derivative (the rows its backward pass
    reads) is the fused pass of :func:`fuses_soft_loss`: float32 and float64 logits only
    (see FUSED_SOFT_MIN_ELEMENTS)."""
    return fuses_soft_loss(x, y) and computes_in_place(x)


def whole_rows_on_cpu(fuses_whole_on_cpu: bool) -> bool:
    """Whether a reduction that XLA's CPU compiler fuses whole (``fuses_whole_on_cpu``) takes
    whole rows: on CPU, from ``CPU_WHOLE_ROWS_JAXLIB`` on."""
    return fuses_whole_on_cpu and backend() == "cpu" and cpu_fuses_whole_rows()


def row_chunk(
    num_rows: int, num_classes: int, fuses_whole: bool = False, fuses_whole_on_cpu: bool = False
) -> int:
    """Rows per chunk of a ``[num_rows, num_classes]`` reduction: at most the backend's byte
    budget of float32, in chunks evened out over the rows (at least one row); all rows where
    ``fuses_whole`` (the reduction is one XLA fuses without a temporary) on a backend in
    ``WHOLE_ROWS_BACKENDS``, or where ``fuses_whole_on_cpu`` on CPU."""
    if (fuses_whole and reads_whole_rows()) or whole_rows_on_cpu(fuses_whole_on_cpu):
        return max(num_rows, 1)
    budget = ROW_CHUNK_BYTES.get(backend(), ROW_CHUNK_BYTES["gpu"])
    rows = max(1, budget // (4 * max(num_classes, 1)))
    if rows >= num_rows:
        return max(num_rows, 1)
    chunks = -(-num_rows // rows)
    return -(-num_rows // chunks)


# The softmax losses' exponentials exp(x - max) on CPU: computing them is most of a loss's time
# there, so the reverse-mode forward pass keeps them (one pass computes and sums them) and the
# backward pass scales them into the gradient. For float32 and float64 logits of the integer-label
# loss, XLA writes the gradient into their buffer (they have its size and dtype): no temporary, at
# any size, with a soft cap too (its exponentials are of the capped logits, and the backward pass
# takes the cap's derivative from the raw logits: value_and_grad at [4096, 4096], 0.1 MiB of
# temporaries on JAX 0.8.2 to 0.12, 0.78x the time of computing them again; 0.83-0.85x at
# [16384, 4096] and [4096, 32768] with z-loss and class weights). Elsewhere they take buffers of
# their own (``kept_buffers``, counted in the compiled programs' temporaries from [1024, 1000] to
# [128, 32768]): soft labels one (their other reductions read them), three for bfloat16 logits;
# bfloat16 and float16 integer-label logits one (float32 exponentials, larger than the gradient),
# three with smoothing (its row sums' summands are written out; two measured with a soft cap and
# no class weights); float32 smoothing one, two with a soft cap (the capped logits beside their
# exponentials). Float32 and float64 smoothing without ``where``, and without a soft cap or with
# one given as a number (``_rows.unguarded``), takes none from jaxlib 0.10.2 on: its sums are
# first taken without a select, as if every class were admissible
# (``_rows.assumes_all_admissible``; the caller passes ``smoothing=False`` then), and bfloat16
# smoothing under a soft cap below ``_rows.small_cap``'s limit takes one, its sums taken from
# the kept exponentials where one buffer fits. Those are kept only while they fit in KEPT_BYTES,
# which a CPU's caches hold; above, the backward pass computes the exponentials again, the trade
# of speed for memory. Measured, value_and_grad of the mean, kept against computed again in the
# same rounds (Intel Xeon, 2 cores, JAX 0.10.2, 2026-12-05; the buffers' total size in brackets):
# - bfloat16, no options: [1024, 2048] 0.53x the time (8 MiB), [2048, 2048] 0.40x and [4096,
#   1000] 0.57x (16 MiB); [4096, 2048] 1.22x (32 MiB), [4096, 4096] 1.33x (64 MiB);
# - bfloat16, a soft cap: [256, 10] 0.57x, [1024, 1000] 0.68x (4 MiB), [2048, 2048] 0.59x
#   (16 MiB); smoothing: [256, 10] 0.50x, [1024, 1000] 0.58x (12 MiB), [1024, 1300] 0.51x
#   (15 MiB); every option: [256, 10] 0.87x, [1024, 1000] 0.68x, [1024, 1300] 0.67x;
# - float32 smoothing: [2048, 1000] 0.65x (8 MiB), [2048, 2048] 0.87x (16 MiB), [4096, 2048]
#   1.16x (32 MiB); with a soft cap, or every option: [1024, 1000] 0.63x (8 MiB), [2048, 1000]
#   0.67x and [1024, 2048] 0.70x (16 MiB), and at 32 MiB 0.73x, 1.18x or 1.28x by shape;
# - soft labels: float32 0.90-1.02x from [2048, 1000] to [2048, 2048], and in rows that their
#   fused pass reduces in sub-rows (``row_blocks``), where the kept ones are reduced whole,
#   1.06-1.13x at [16, 131072], [32, 131072] and [64, 65536]; bfloat16 [1024, 1000] 1.07x
#   (12 MiB), [1024, 2048] 0.53x, [2048, 2048] 1.39x and [4096, 1000] 0.73x (above). So soft
#   labels keep exponentials of up to SOFT_KEPT_BYTES only (three buffers of 4 MiB in bfloat16).
# Smoothing over the admissible classes is slower kept at large sizes (1.73x / 2.08x its time at
# [4096, 4096] against optax's plain loss): XLA writes the summands of its row sums (the
# admissible count, the gap) out whole before their reductions. Written without a compare or a
# select (the count as a sum of ``1 + max(x - max(x, lowest), -1)``), XLA kept broadcasts the
# sums share whole instead (128 MiB kept, 2 MiB in chunks), and it was no faster.
# Guarded by tests/test_memory.py::test_float32_on_cpu_needs_no_temporaries,
# ::test_kept_exponentials_stay_within_their_budget,
# ::test_float32_on_cpu_takes_one_exponential_pass and
# ::test_one_exponential_pass_on_cpu_within_the_budget (the other bounds of
# tests/test_memory.py are measured above KEPT_BYTES).
KEPT_BYTES = 16 * 2**20
SOFT_KEPT_BYTES = 4 * 2**20


def computes_in_place(x: jax.Array) -> bool:
    """Whether ``x``'s arithmetic happens in its own dtype (float32, float64): no float32 copy
    of it for XLA to keep."""
    return compute_dtype(x.dtype) == x.dtype


def kept_buffers(
    x: jax.Array, *, soft_cap: bool = False, smoothing: bool = False, soft_labels: bool = False
) -> int | None:
    """How many arrays of the logits ``x``'s size, in the compute dtype, a softmax loss's
    derivative keeps beside the gradient when it keeps the exponentials (0: they take the
    gradient's buffer), given its options (a soft cap, label smoothing) and whether its labels
    are soft; None where they are never kept (smoothing of soft labels). ``smoothing``: sums
    over the admissible classes, with a select per entry (not so for the integer-label loss's
    smoothing taken as if every class were admissible, ``_rows.assumes_all_admissible``, which
    takes what the loss without smoothing does)."""
    wide = computes_in_place(x)
    if soft_labels:
        return None if smoothing else (1 if wide else 3)
    if not wide:
        return 3 if smoothing else 1
    if smoothing:
        return 2 if soft_cap else 1
    return 0


def saves_exponentials(
    x: jax.Array, *, soft_cap: bool = False, smoothing: bool = False, soft_labels: bool = False
) -> bool:
    """Whether a softmax loss's derivative keeps ``exp(x - max)`` of the logits ``x`` rather than
    computing it again: on CPU, where the buffers it takes (:func:`kept_buffers`) fit in
    KEPT_BYTES, and for soft labels where the exponentials fit in SOFT_KEPT_BYTES."""
    if backend() != "cpu":
        return False
    buffers = kept_buffers(x, soft_cap=soft_cap, smoothing=smoothing, soft_labels=soft_labels)
    size = x.size * jnp.dtype(compute_dtype(x.dtype)).itemsize
    if buffers is None or (soft_labels and size > SOFT_KEPT_BYTES):
        return False
    return buffers * size <= KEPT_BYTES


# With kept exponentials, the derivative's label term -b [k = y] is a gather of the tangent,
# which reverse mode turns into an addition to one entry per row (a scatter), instead of a
# compare and a select at every entry of the gradient. Fewer operations per entry also keep XLA's
# CPU cost model from splitting a small gradient over threads, whose wake-up is most of a small
# call (bfloat16 [256, 10] value_and_grad: 64 µs instead of 220, optax 75). For float32 and
# float64 logits the scatter updates the gradient in place. For narrower ones it needs a float32
# gradient buffer beside the exponentials before the conversion, which costs more than it saves
# once the two leave the cache (bfloat16 [1024, 1000], 3.9 MiB of exponentials: 1.27x optax's
# speed against 1.40x without), so there it is used up to SCATTER_BYTES of exponentials.
# Guarded by tests/test_memory.py::test_label_term_is_scattered_where_it_pays.
SCATTER_BYTES = 2**20


def scatters_label_term(x: jax.Array, exponentials: jax.Array) -> bool:
    """Whether the derivative of a softmax loss with logits ``x`` and kept ``exponentials``
    adds its label term to one entry per row rather than selecting it at every entry."""
    if exponentials.dtype == x.dtype:
        return True
    return exponentials.size * exponentials.dtype.itemsize <= SCATTER_BYTES


def class_axis_sharded(x: jax.Array) -> bool:
    """Whether ``x``'s class (last) axis is split over a mesh axis with explicit sharding."""
    spec: tuple[object, ...] = getattr(jax.typeof(x).sharding, "spec", ())
    return len(spec) == x.ndim and spec[-1] is not None


def pick(x: jax.Array, index: jax.Array) -> jax.Array:
    """``x[..., index]`` as ``[..., 1]`` in ``x``'s dtype: the label's logit.

    A gather; when the class axis is explicitly sharded a gather would need the other shards'
    columns, so a masked sum reduces locally instead and all-reduces one number per example.
    """
    if class_axis_sharded(x):
        columns = jax.lax.broadcasted_iota(index.dtype, x.shape, x.ndim - 1)
        hit = columns == index[..., None]
        return jnp.sum(jnp.where(hit, x, jnp.zeros_like(x)), axis=-1, keepdims=True)
    return jnp.take_along_axis(x, index[..., None], axis=-1)


# The fused loss's products of x, w and the derivative blocks. Inputs of one dtype are multiplied
# in it: bfloat16 operands run at the hardware's full rate, accumulated in float32, and each
# float32 derivative block is rounded to bfloat16 for ``dx`` and ``dw``, as the unfused loss's
# bfloat16 gradient is. Float32 blocks of w halve the rate or worse: on an H200 (bfloat16
# 16384 x 4096 x 131072) 253 ms with them, 124 ms without (the three products alone, 79 ms);
# on 2 cores of an Intel Xeon with AMX, whose XLA runs a bfloat16 product with a float32 result
# at twice float32's rate, the bfloat16 loss took 0.56-0.58x the time it took with float32
# blocks (1024 x 256 x 8192, 8192 x 256 x 4096, 4096 x 512 x 32768). Not measured: a CPU
# without bfloat16 instructions, where XLA converts the operands to float32 itself, as this
# code did before. The exception is float16 on CPU, whose products took the same time either
# way (XLA computes them in float32): there the derivative blocks keep their float32 digits.
# Mixed inputs are multiplied in the compute dtype everywhere, as ``x @ w`` promotes them
# (``w`` converted a chunk at a time: :func:`columns`). Guarded by
# tests/test_linear.py::test_narrow_blocks_are_multiplied_as_they_are.
def product_dtype(x: jax.Array, w: jax.Array, dtype):
    """The dtype the fused loss's blocks of ``x``, ``w`` and ``dloss/dz`` are multiplied in
    (``dtype``: the one its arithmetic happens in, float32 or float64)."""
    if x.dtype != w.dtype or (x.dtype == jnp.float16 and backend() == "cpu"):
        return jnp.dtype(dtype)
    return jnp.dtype(x.dtype)


def staged() -> bool:
    """Whether JAX is staging a program here (under ``jax.jit``, or in a loop's or a branch's
    body) rather than running operations one by one.

    Outside ``jax.jit``, a ``lax`` loop or ``cond`` is compiled as a program of its own, and its
    body, a closure made at each call, is a new program each time: every call compiled it again,
    and JAX's caches kept every one (``logsumexp`` of a float32 [512, 1000] array: 196 ms a
    call, and 2 MB more memory each, where ``jax.nn.logsumexp`` takes 3 ms). So unstaged, the
    loops run as Python loops and the branches as Python ``if``s, each operation compiled once
    per shape (tests/test_memory.py::test_calls_outside_jit_compile_nothing_again)."""
    return isinstance(jnp.zeros((), jnp.int32), jax.core.Tracer)


@jax.custom_batching.custom_vmap
def _sum_of_zeros(v: jax.Array) -> jax.Array:
    """``sum(v * 0)``: NaN where an entry of ``v`` is not finite, else 0 exactly; under ``vmap``,
    of the whole batch, unbatched. An ``any`` of booleans costs 0.2-0.3 s of XLA CPU compile
    time per shape (its reduce-window kernels), this about 20 ms; a max of ``|v|`` passes over a
    NaN in XLA's CPU reductions."""
    return jnp.sum(v * 0)


@_sum_of_zeros.def_vmap
def _sum_of_zeros_rule(axis_size, in_batched, v):
    return _sum_of_zeros(v), False


@jax.custom_jvp
def _predicate_sum(v: jax.Array) -> jax.Array:
    """:func:`_sum_of_zeros` with a zero tangent: it only decides a branch, and a derivative
    taken of a derivative rule may trace it (``custom_vmap`` alone has no reverse mode)."""
    return _sum_of_zeros(v)


@_predicate_sum.defjvp
def _predicate_sum_jvp(primals, tangents):
    out = _predicate_sum(*primals)
    return out, jnp.zeros_like(out)


def nonfinite_anywhere(v: jax.Array) -> jax.Array:
    """Whether any entry of ``v`` is not finite (a scalar boolean); under ``vmap``, any entry of
    the whole batch, unbatched, so that a ``lax.cond`` on it stays a branch rather than a select
    of both sides."""
    return _predicate_sum(v) != 0


def unless_nonfinite(check: jax.Array, fast: Callable[[], T], exact: Callable[[], T]) -> T:
    """``fast()``, a result computed on the assumption that the input is plain (no infinite or
    NaN entry, nothing masked), unless ``check`` (a part of it that is not finite where that
    assumption fails) holds a number that is not finite anywhere in the batch: then
    ``exact()``, computed for the whole batch. One branch for the batch (under ``vmap`` too:
    :func:`nonfinite_anywhere`), which costs the exact pass only where an input needs it; op by
    op (not :func:`staged`), a Python branch."""
    suspect = nonfinite_anywhere(check)
    if not isinstance(suspect, jax.core.Tracer):
        return exact() if bool(suspect) else fast()
    return jax.lax.cond(suspect, exact, fast)


def chunk(a: jax.Array, start, size: int, axis: int, shape=None) -> jax.Array:
    """``a[start:start + size]`` along ``axis``, inside a loop whose index ``start`` depends on;
    reshaped to ``shape`` if given.

    XLA's CPU backend moves a conversion of the chunk (to float32: a float16 ``w``'s columns,
    or a bfloat16 ``w`` beside a float32 ``x``, for products in float32; a narrow product XLA
    computes in float32 itself) ahead of the ``dynamic_slice`` and then out of the loop: a
    float32 copy of all of ``a`` (optimization barriers are removed before that happens on
    CPU). Read inside a ``cond`` whose predicate depends on the loop index, the chunk comes out
    of an opaque call and the conversion stays after it, so only one chunk is ever float32.
    Both branches read the chunk (the predicate, ``start >= 0``, always holds): identical
    branches are one kernel for XLA's CPU compiler to generate, where a second branch of its
    own was one more. Guarded by tests/test_memory.py and
    tests/test_linear.py::test_a_narrow_w_is_never_converted_whole.
    """

    def shaped(part):
        return part if shape is None else jnp.reshape(part, shape)

    def read(a):
        return shaped(jax.lax.dynamic_slice_in_dim(a, start, size, axis))

    if a.dtype == jnp.float32 or a.dtype == jnp.float64 or backend() != "cpu":
        return read(a)
    if not isinstance(start, jax.Array) or not staged():
        return read(a)

    # The reshape inside the branches: one after the cond costs a copy of the chunk.
    return jax.lax.cond(start >= 0, read, read, a)


def columns(w: jax.Array, col0, cols: int, dtype) -> jax.Array:
    """Columns ``[col0, col0 + cols)`` of ``w`` (``[D, cols]``), in ``dtype`` (see :func:`chunk`:
    a narrow ``w`` multiplied in float32 is converted a chunk at a time, never as a whole)."""
    if cols == w.shape[1] and not isinstance(col0, jax.Array):
        return w
    return chunk(w, col0, cols, 1).astype(dtype)
