"""The fused linear + softmax cross-entropy: the loss of the logits ``x @ w + bias`` without them.

In a language model the last layer's logits ``[N, V]`` (N tokens, a vocabulary of V up to
256k) dominate memory. This module computes the integer-label cross-entropy of
``x @ w + bias`` block by block (``_blocks``), so no ``[N, V]`` array exists in the forward or the
backward pass, with exactly the per-row mathematics of the plain loss (``_rows``).

Strategies, all hand-written derivatives:

* **single pass** (a reduced loss, float32 or float64 ``w``, except on CPU:
  ``_xla.TWO_PASS_BACKENDS``; or ``recompute_logits=False``): over chunks of ``token_chunk``
  rows, the
  forward rule computes the block of logits for the whole vocabulary, its row statistics and
  at once ``dz``, ``dx = dz w^T`` and ``dw += x^T dz``: 6NDV FLOPs. The cotangent of a reduced
  loss is one scalar, so these unscaled gradients are what reverse mode keeps, and the
  ``jax.custom_jvp`` rule's tangent is their contraction with the inputs' tangents.
* **two passes** (a reduced loss on CPU, where they are faster; one with a bfloat16/float16
  ``w``, whose single pass would need a float32 ``[D, V]`` accumulator, which a bfloat16
  ``w``'s two passes do without; or ``recompute_logits=True``): the row statistics first, then
  the gradients chunk of vocabulary by chunk, each chunk of ``dw`` complete and written in
  ``w``'s dtype (float32 for a float16 ``w``, whose range the sum's gradient can exceed:
  ``_blocks.kept_dw_dtype``): 8NDV FLOPs.
* **recompute** (``reduction="none"``, whose per-token cotangent is only known after the
  forward pass): a ``jax.custom_vjp`` whose forward rule keeps the row statistics (O(N)) and
  whose backward rule computes the blocks again with the cotangent: 8NDV FLOPs. Reverse mode
  only (see the README); the reduced losses support forward mode too.

The single pass runs every token chunk in one loop, the last one shifted back to overlap its
predecessor, whose rows count as ignored tokens there; the other strategies run full chunks in a
loop and the remainder as one more statically sized block. Nothing is padded.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxce import _autodiff, _blocks, _checks, _labels, _loops, _mesh, _rows, _xla
from jaxce._reduction import reduce_loss


class _Static(NamedTuple):
    blocks: _blocks.Static
    single_pass: bool  # the single-pass strategy (else two passes), for reduced losses


def _row_results(stats, meaning, label_logit, weights, options, dtype):
    """Per-row loss, counted weight and what the derivatives need (the label's logit within
    its row's max among them), from whole-row stats."""
    label_logit = _rows.label_logit_within(label_logit, stats)
    w_y = _rows.label_weight(weights, meaning.class_index, dtype)
    rows = _rows.status(meaning, stats)
    loss = _rows.finalize(_rows.row_loss(stats, label_logit, w_y, options), rows)
    counted = _rows.counted(w_y, rows)
    return loss[:, 0], counted[:, 0], (label_logit, w_y, rows)


def _forward(x, w, bias, labels, weights, options, static: _blocks.Static):
    """The per-token loss from the statistics pass; and what the derivatives need."""
    dtype = _blocks.dtype_of(x, w)
    v = w.shape[1]
    meaning = _labels.classify(labels, v, static.ignore_index)
    stats = _rows.finish(_blocks.statistics(x, w, bias, weights, options, static, dtype), v)
    label_logit = _blocks.label_logits(x, w, bias, meaning.class_index, options, dtype)
    loss, counted, (label_logit, w_y, rows) = _row_results(
        stats, meaning, label_logit, weights, options, dtype
    )
    return loss, counted, (meaning, stats, label_logit, w_y, rows)


# ------------------------------------------------------------ per token: reduction="none"
# Residuals: the inputs (alive anyway) and float32 row statistics, O(N); the backward rule
# computes each block of logits again (_blocks.gradients).
@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _per_token(x, w, bias, labels, weights, options, static):
    loss, counted, _ = _forward(x, w, bias, labels, weights, options, static)
    return loss, counted


def _per_token_fwd(x, w, bias, labels, weights, options, static):
    loss, counted, parts = _forward(x, w, bias, labels, weights, options, static)
    return (loss, counted), (x, w, bias, weights, options, parts)


def _per_token_bwd(static, res, cotangents):
    x, w, bias, weights, options, (meaning, stats, label_logit, w_y, rows) = res
    g, g_counted = (c.astype(stats.shift.dtype)[:, None] for c in cotangents)
    dtype = stats.shift.dtype
    info = _blocks.RowInfo(meaning.class_index, w_y, rows, g)
    needs = _blocks.Needs.every(bias, weights, options)
    grads = _blocks.gradients(x, w, bias, weights, options, static, stats, info, dtype, needs)
    assert grads.x is not None  # Needs.every: every derivative the inputs have
    per_label, d_eps, d_zl = _blocks.row_cotangents(
        stats, label_logit, w_y, rows, g, g_counted, weights is not None, options
    )
    d_weights = None
    if weights is not None:
        d_weights = jnp.zeros(weights.shape, dtype).at[meaning.class_index].add(per_label)
        if grads.smoothing_weights is not None:
            d_weights = d_weights + grads.smoothing_weights
        d_weights = d_weights.astype(weights.dtype)
    # Inside a caller's shard_map, an input the same on every device (w replicated over the
    # data axis) receives the sum of the devices' contributions.
    return (
        _loops.sum_to(grads.x.astype(x.dtype), x),
        _loops.sum_to(grads.w, w),
        None if grads.bias is None else _loops.sum_to(grads.bias.astype(bias.dtype), bias),
        None,
        _loops.sum_to(d_weights, weights),
        _rows.Options(
            *(
                _loops.sum_to(ct, primal)
                for ct, primal in zip((d_eps, d_zl, grads.cap), options, strict=True)
            )
        ),
    )


_per_token.defvjp(_per_token_fwd, _per_token_bwd)


# ------------------------------------------------------------ summed: "mean" and "sum"
# Outputs: the sum of the per-token losses and each token's counted weight (for a mean).
@functools.partial(jax.custom_jvp, nondiff_argnums=(6,))
def _summed(x, w, bias, labels, weights, options, static: _Static):
    loss, counted, _ = _forward(x, w, bias, labels, weights, options, static.blocks)
    return jnp.sum(loss), counted


def _single_pass(x, w, bias, meaning, weights, options, static: _blocks.Static, needs):
    """Row statistics and the unscaled gradients of the summed loss in one pass over token
    chunks: each chunk's ``[rows, V]`` logits are reduced and differentiated while they exist.

    Returns ``(stats, label_logit, grads)``; the last chunk overlaps its predecessor, whose
    rows add nothing to the gradients there.
    """
    dtype = _blocks.dtype_of(x, w)
    (n, d), v = x.shape, w.shape[1]
    lanes = _blocks.token_lanes(x, static)
    run = static.token_chunk // lanes.number  # rows of each lane in a chunk
    x_lanes, meaning_lanes = lanes.view(x), jax.tree.map(lanes.view, meaning)

    def token_body(t0, fresh, acc):
        stats_acc, z_y_acc, dx, dw, db, dwt, dcap = acc
        x_t = lanes.cut(x_lanes, t0, run)
        meaning_t = jax.tree.map(lambda a: lanes.cut(a, t0, run), meaning_lanes)
        if fresh is not None:
            fresh = lanes.tile(fresh)
        raw = _block_logits(x_t, w, bias, static.vocab_chunk, dtype)
        stats_t = _rows.finish(_rows.partial_stats(raw, None, weights, options, v), v)
        label_logit = _blocks.label_logits(x_t, w, bias, meaning_t.class_index, options, dtype)
        w_y = _rows.label_weight(weights, meaning_t.class_index, dtype)
        rows = _rows.status(meaning_t, stats_t)
        if fresh is not None:  # rows of the previous chunk count as ignored tokens here
            keep = fresh[:, None]
            rows = _rows.Status(rows.active & keep, rows.poisoned & keep)
        info = _blocks.RowInfo(meaning_t.class_index, w_y, rows, jnp.ones_like(w_y))
        z, adm, dz, draw = _blocks.block_derivative(raw, 0, weights, stats_t, info, options)
        if needs.x or needs.w:
            x_live = _blocks.live_rows(x_t, rows) if needs.w else x_t
            dx_t, dw = _block_grads(x_live, w, draw, dw, static.vocab_chunk, dtype, needs)
            if needs.x:
                if fresh is not None:
                    previous = lanes.cut(dx, t0, run)
                    dx_t = jnp.where(fresh[:, None], dx_t, previous)
                dx = lanes.paste(dx, dx_t, t0)
        if needs.bias:
            db = db + jnp.sum(draw, axis=0)
        if needs.smoothing_weights:
            spread = _rows.smoothing_weight_derivative(z, adm, stats_t, options)
            dwt = dwt + jnp.sum(_rows.finalize(spread, rows), axis=0)
        if needs.cap:
            dcap = dcap + jnp.sum(_rows.cap_derivative(raw, dz, options))
        stats_acc = jax.tree.map(lambda a, s: lanes.paste(a, s, t0), stats_acc, stats_t)
        z_y_acc = lanes.paste(z_y_acc, label_logit, t0)
        return stats_acc, z_y_acc, dx, dw, db, dwt, dcap

    column = lanes.view(jnp.zeros((n, 1), dtype))
    smoothing = options.smoothing
    stats0 = _rows.Stats(column, column, *((column,) * 4 if smoothing else (None,) * 4))
    init = (
        stats0,
        column,
        lanes.view(jnp.zeros((n, d), dtype)) if needs.x else jnp.zeros((0, 0), dtype),
        jnp.zeros((d, v) if needs.w else (0, 0), dtype),
        jnp.zeros((v,), dtype),
        jnp.zeros((v,), dtype),
        jnp.zeros((), dtype),
    )
    init = _loops.vary_like(init, x, w, bias, weights, meaning)
    stats, label_logit, dx, dw, db, dwt, dcap = _loops.overlapping_chunks(
        n // lanes.number, run, token_body, init
    )
    stats, label_logit = jax.tree.map(lanes.whole, (stats, label_logit))
    grads = _blocks.Grads(
        lanes.whole(dx) if needs.x else None,
        dw if needs.w else None,
        db if needs.bias else None,
        dwt if needs.smoothing_weights else None,
        dcap if needs.cap else None,
    )
    return stats, label_logit, grads


def _block_logits(x_t, w, bias, cols_per_step, dtype):
    """The ``[rows, V]`` logits of rows ``x_t``, a vocabulary chunk at a time."""
    n_rows, v = x_t.shape[0], w.shape[1]

    def body(c0, cols, block):
        return _loops.paste(block, _blocks.logits(x_t, w, bias, c0, cols, dtype), c0, 1)

    init = _loops.vary_like(jnp.zeros((n_rows, v), dtype), x_t, w, bias)
    return _loops.for_chunks(v, cols_per_step, body, init)


def _block_grads(x_t, w, draw, dw, cols_per_step, dtype, needs):
    """``draw w^T`` and ``dw += x_t^T draw``, a chunk of columns at a time, ``dw`` in place:
    one product would be a second ``[D, V]`` buffer (XLA's CPU backend does not fuse the
    addition into the product). The chunks are evened out, so the last one overlaps its
    predecessor by fewer columns than there are chunks."""
    v = draw.shape[1]
    cols = -(-v // -(-v // cols_per_step))
    operand = _xla.product_dtype(x_t, w, dtype)

    def body(c0, fresh, acc):
        dx_t, dw = acc
        dz_c = _loops.cut(draw, c0, cols, 1).astype(operand)
        if fresh is not None:  # columns of the previous chunk: already counted
            dz_c = jnp.where(fresh[None, :], dz_c, jnp.zeros_like(dz_c))
        if needs.x:
            dx_t = dx_t + _blocks.matmul(dz_c, _xla.columns(w, c0, cols, operand), (1, 1), dtype)
        if needs.w:
            product = _blocks.matmul(x_t, dz_c, (0, 0), dtype)
            dw = _loops.paste(dw, _loops.cut(dw, c0, cols, 1) + product, c0, 1)
        return dx_t, dw

    init = _loops.vary_like((jnp.zeros((x_t.shape[0], w.shape[0]), dtype), dw), x_t, w, draw)
    return _loops.overlapping_chunks(v, cols, body, init)


def _summed_jvp(static: _Static, primals, tangents):
    x, w, bias, labels, weights, options = primals
    dots = _blocks.dots_of(tangents, bias, weights, options)
    needs = dots.needs(options)
    dtype = _blocks.dtype_of(x, w)
    blocks = static.blocks
    meaning = _labels.classify(labels, w.shape[1], blocks.ignore_index)
    if static.single_pass:
        stats, label_logit, grads = _single_pass(
            x, w, bias, meaning, weights, options, blocks, needs
        )
        loss, counted, (label_logit, w_y, rows) = _row_results(
            stats, meaning, label_logit, weights, options, dtype
        )
    else:
        loss, counted, (meaning, stats, label_logit, w_y, rows) = _forward(
            x, w, bias, labels, weights, options, blocks
        )
        info = _blocks.RowInfo(meaning.class_index, w_y, rows, jnp.ones_like(w_y))
        grads = _blocks.gradients(
            x, w, bias, weights, options, blocks, stats, info, dtype, needs, summed=True
        )
    t = _autodiff.add(
        _autodiff.contract(grads.x, dots.x, dtype), _blocks.column_tangent(grads, dots, dtype)
    )
    w_y_dot = None
    if dots.rows.weights is not None:
        w_y_dot = _rows.label_weight(dots.rows.weights, meaning.class_index, dtype)
    parts = (stats, label_logit, w_y, rows)
    return _blocks.summed_outputs(loss, counted, t, parts, w_y_dot, dots, options)


_summed.defjvp(_summed_jvp, symbolic_zeros=True)


# ------------------------------------------------------------------------------ public API
def _single_pass_rows(n: int, v: int, budget: int) -> int:
    """The default ``token_chunk`` of the single pass: at most ``budget`` bytes per float32
    ``[rows, V]`` block and at most an eighth of the tokens, in equal chunks.

    XLA keeps two blocks alive at once (the logits, then the probabilities and ``dz``), plus
    ``[D, cols]`` products: an eighth of the tokens keeps the blocks at a quarter of the
    ``[N, V]`` logits of the unfused loss even where the byte budget would allow all of them
    (small V; measured with ``memory_analysis``, a quarter of the tokens left too little room
    where D is large next to N). The chunks are then evened out (``ceil(N / chunks)`` rows),
    so the last one, which overlaps its predecessor, recomputes fewer rows than there are
    chunks.
    """
    rows = max(1, min(budget // (4 * v), -(-n // 8)))
    chunks = -(-n // rows)
    return -(-n // chunks)


def _single_pass_cols(rows: int, d: int, v: int, default: int) -> int:
    """The default ``vocab_chunk`` of the single pass. Each ``dw += x_t^T dz`` product is a
    ``[D, cols]`` temporary (two, with the slice of ``dw`` it is added to): where D is large
    next to the rows, so that they would outgrow half a ``[rows, V]`` block, ``cols`` is cut to
    a quarter block's worth, but never below 128 columns (an inner loop over more, smaller
    products costs time and a copy of the loop-carried ``dw``, so only when it pays)."""
    cols = min(default, v)
    if d * cols <= rows * v // 2:
        return cols
    return max(1, min(cols, max(128, rows * v // (4 * d))))


def linear_softmax_cross_entropy(
    x: jax.typing.ArrayLike,
    w: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    bias: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = None,
    class_weights: jax.typing.ArrayLike | None = None,
    label_smoothing: float | jax.typing.ArrayLike = 0.0,
    z_loss: float | jax.typing.ArrayLike = 0.0,
    logit_soft_cap: float | jax.typing.ArrayLike | None = None,
    reduction: str = "mean",
    token_chunk: int | None = None,
    vocab_chunk: int | None = None,
    recompute_logits: bool | None = None,
) -> jax.Array:
    r"""Softmax cross-entropy of the logits ``x @ w + bias``, without materializing them.

    Equal, in value and gradients (to float32 rounding of the logits: the label's logit is a
    product of its own, which rounds apart from the matmul's, so a label that dominates its row
    has a loss of a few units in the last place of the logits rather than about 0), to
    ``softmax_cross_entropy_with_integer_labels(x @ w + bias, labels, ..., reduction=reduction)``
    with the same options, but no ``[N, V]`` array is ever allocated (``N`` tokens, ``V``
    classes): the logits are computed, reduced and differentiated one block at a time. For
    example :math:`i` with logits :math:`z = \mathrm{cap}\tanh((x_i w + b)/\mathrm{cap})`:

    .. math::
        \ell_i = (1-\varepsilon)\, w_y (\mathrm{lse}(z) - z_y)
          + \frac{\varepsilon}{K} \sum_{c \in A} w_c (\mathrm{lse}(z) - z_c)
          + \lambda_z\, w_y\, \mathrm{lse}(z)^2

    Unlike the other losses, whose default is per example, the default reduction here is
    ``"mean"``: a language model's loss is the mean over its tokens, and a reduced loss is what
    lets the gradients be computed in the same pass as the loss (6NDV FLOPs, the three matmuls
    any implementation needs). With ``"none"`` the per-token cotangent is only known afterwards,
    so the backward pass computes the logits again block by block (8NDV FLOPs).
    bfloat16/float16 ``x`` and ``w`` are multiplied with float32 accumulation, and ``w`` is never
    converted to float32 as a whole. The blocks are multiplied in that dtype (the hardware's
    full rate), each block of ``dloss/dz`` rounded to it for ``dx`` and ``dw`` as the unfused
    loss's gradient is; float16 ones in float32 on a CPU, whose XLA computes them so. Float32
    products take JAX's default precision, as ``x @ w`` does (TF32 on recent NVIDIA GPUs);
    wrap the call in ``jax.default_matmul_precision("highest")`` for full float32.

    Args:
      x: ``[..., D]`` floating-point activations (the last hidden states).
      w: ``[D, V]`` output projection (the layout of a Flax ``Dense`` kernel), ``V >= 1``.
      labels: integer class indices of shape ``x.shape[:-1]``.
      bias: optional ``[V]`` output bias (a ``-inf`` entry removes that class).
      ignore_index: label value that marks a token to skip (loss 0, gradient 0, not counted
        in a mean); PyTorch uses -100. ``None`` ignores nothing.
      class_weights: optional ``[V]`` weights, PyTorch's ``weight``.
      label_smoothing: :math:`\varepsilon \in [0, 1]`, PyTorch's semantics.
      z_loss: :math:`\lambda_z \ge 0`, PaLM's auxiliary :math:`\lambda_z \mathrm{lse}^2`.
      logit_soft_cap: optional cap in ``[2**-64, 2**64]`` applied to the logits
        (Gemma 2 uses 30); ``None`` or ``inf`` means no cap.
      reduction: ``"mean"`` (default: sum over tokens divided by the summed class weights of
        the counted tokens, as PyTorch; 0 if none), ``"sum"`` or ``"none"`` (per token, the
        labels' shape).
      token_chunk: rows per block (default per backend). In the single-pass strategy the block
        is ``[token_chunk, V]`` in float32, so the default is chosen from a byte budget.
      vocab_chunk: columns per block of the other strategies, and per product of the
        single-pass strategy (default per backend, cut on CPU where D is large; the whole
        vocabulary in the single pass on GPUs).
      recompute_logits: for a reduced loss, ``False`` computes the gradients in one pass
        (6NDV FLOPs; with a bfloat16/float16 ``w`` a float32 ``[D, V]`` accumulator), ``True``
        computes the row statistics first and then the gradients a vocabulary chunk at a time
        (8NDV FLOPs, ``dw`` accumulated chunk by chunk in float32 and kept in ``w``'s dtype,
        but in float32 for a float16 ``w``, where the gradient of the sum over tokens, which
        the cotangent scales afterwards, can be beyond float16's range).
        ``None`` (default): one pass for a float32/float64 ``w`` on GPUs and TPUs, two on CPU
        (faster there, 0.58-0.93x the single pass's time at four of five shapes measured, and
        less memory where V is large: the README's "How it works") and for bfloat16/float16,
        whose memory is the point of this loss (for bfloat16; a float16 ``w`` keeps a float32
        ``dw`` either way); where the accumulator fits, one pass is faster
        on a GPU (value_and_grad on an H200 at N, D, V = 16384, 4096, 131072 in bfloat16:
        95 ms with 2.5 GiB of temporaries against 128 ms with 544 MiB; the unfused loss 82 ms
        with 8 GiB).

    Returns:
      The loss in float32 (float64 for float64 inputs): a scalar, or per token for
      ``reduction="none"``. A label outside ``[0, V)`` that is not ``ignore_index`` gives NaN
      for that token. Gradients flow to ``x``, ``w``, ``bias``, ``class_weights`` and traced
      ``label_smoothing``, ``z_loss`` and ``logit_soft_cap``, each in its own dtype. Reduced
      losses are differentiable in forward mode too (``jax.jvp``, ``jax.jacfwd``); the
      per-token loss (``"none"``) in reverse mode only.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxce
      >>> x = jax.random.normal(jax.random.key(0), (2, 5, 16))  # [batch, seq, D]
      >>> w = jax.random.normal(jax.random.key(1), (16, 100)) / 4  # [D, V]
      >>> labels = jnp.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, -100]])
      >>> loss = jaxce.linear_softmax_cross_entropy(x, w, labels, ignore_index=-100)
      >>> unfused = jaxce.softmax_cross_entropy_with_integer_labels(
      ...     x @ w, labels, ignore_index=-100, reduction="mean")
      >>> bool(jnp.allclose(loss, unfused, rtol=1e-5))
      True
      >>> dx, dw = jax.grad(jaxce.linear_softmax_cross_entropy, argnums=(0, 1))(x, w, labels)
      >>> dw.shape
      (16, 100)

    References:
      Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models", 2024 (the
      blockwise idea); PyTorch ``cross_entropy``; Chowdhery et al., "PaLM", 2022 (z-loss);
      Gemma Team, "Gemma 2", 2024 (soft-capping).
    """
    x, w, labels, ignore_index = _blocks.check_arguments(x, w, labels, reduction, ignore_index)
    d, v = w.shape
    if bias is not None:
        bias = _checks.as_float_array("bias", bias)
        _checks.check_shape("bias", bias, (v,), f"one entry per class, V={v}")
    weights = _checks.class_vector("class_weights", class_weights, v, f"one entry per class, V={v}")
    if recompute_logits is not None and not isinstance(recompute_logits, bool):
        raise TypeError(f"recompute_logits must be True, False or None; got {recompute_logits!r}.")
    dtype = _blocks.dtype_of(x, w)
    options = _rows.make_options(dtype, label_smoothing, z_loss, logit_soft_cap)
    if reduction == "none" and recompute_logits is False:
        raise ValueError(
            'recompute_logits=False needs reduction="mean" or "sum": the per-token cotangent'
            ' of reduction="none" is only known after the forward pass.'
        )
    for name, value in (("token_chunk", token_chunk), ("vocab_chunk", vocab_chunk)):
        _blocks.chunk_size(name, value, 1, 1)  # validated even when there is no token
    if labels.size == 0:  # no tokens: an empty per-token loss, a zero sum and the empty mean's 0
        return jnp.zeros(labels.shape if reduction == "none" else (), dtype)

    def fused(x, labels, shared):
        """The loss of this device's tokens (all of them on one device): per token, or their
        sum and count."""
        w, bias, weights, options = shared
        x2, labels1 = jnp.reshape(x, (labels.size, d)), jnp.reshape(labels, (labels.size,))
        n = x2.shape[0]
        default_rows, default_cols, budget = _xla.chunk_defaults()
        if recompute_logits is None:  # the default (see recompute_logits above)
            single_pass = reduction != "none" and w.dtype == dtype and _xla.single_pass_by_default()
        else:  # False with reduction="none" was refused above
            single_pass = not recompute_logits
        if single_pass:
            rows = _blocks.chunk_size(
                "token_chunk", token_chunk, _single_pass_rows(n, v, budget), n
            )
            whole = _xla.whole_vocab_single_pass()
            cols = v if whole else _single_pass_cols(rows, d, v, default_cols)
        else:
            rows, cols = default_rows, _blocks.vocab_chunk_of_two_passes(d, dtype)
        static = _blocks.Static(
            ignore_index,
            _blocks.chunk_size("token_chunk", token_chunk, rows, n),
            _blocks.chunk_size("vocab_chunk", vocab_chunk, cols, v),
            v,
        )
        if reduction == "none":
            losses, _ = _per_token(x2, w, bias, labels1, weights, options, static)
            return jnp.reshape(losses, labels.shape)
        single = _Static(static, single_pass)
        total, counted = _summed(x2, w, bias, labels1, weights, options, single)
        return total, jnp.sum(counted)

    shared = (w, bias, weights, options)
    tokens = (x, labels)
    if reduction == "none":
        return _mesh.on_own_rows(fused, tokens, shared, axes=labels.ndim)
    total, counted = _mesh.on_own_rows(fused, tokens, shared, axes=labels.ndim, summed=True)
    return reduce_loss(total[None], reduction, counted)
