"""Cross-entropy over a vocabulary sharded across devices (tensor parallelism).

Each device holds ``V / P`` columns of the logits (or of the output projection ``w``) and the
full rows of its tokens. The loss needs only per-row statistics of the whole vocabulary, so the
devices exchange ``O(N)`` numbers, never the logits:

* ``pmax`` of the local row maxima (``N`` floats), the shift ``M`` of the logsumexp;
* ``psum`` of the local ``sum exp(z - M)``, of the label's logit (and class weight) from the
  shard that owns the label's column (the others add 0) and, with label smoothing, of the
  admissible count ``K``, the weight total ``W`` and the weighted logit sum, all over the *global*
  vocabulary (smoothing over the local shard only is a classic Megatron bug).

The global ``RowStats`` then go through the same ``row_loss``/``row_grad_coefficients``/
``logit_gradient`` as the single-device loss (``_cross_entropy``), so there is one formula. The
backward rules are local: ``dz`` of the local columns needs only the global row statistics saved
by the forward pass. What does cross devices in the backward pass is what the mathematics asks
for: the gradient of an input that every shard of the vocabulary shares (``x`` of the fused loss,
a traced hyperparameter, class weights replicated over a data axis) is the sum of the shards'
contributions.

Those sums follow the types of ``jax.shard_map(check_vma=True)`` (JAX's default): a cotangent
that varies over mesh axes its primal does not vary over is summed over them (``_sum_to``), as
JAX's own transpose of ``pvary`` does. Under ``check_vma=False`` nothing is typed, so only the
fused loss's ``dx`` is summed over the vocabulary axis, which is the contract (``x`` is
replicated there).

Padded vocabularies: columns at or beyond ``vocab_size`` (global index) are not classes: they
are excluded from every statistic, like a ``where=False`` entry.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Hashable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxce import _checks, _linear
from jaxce._cross_entropy import (
    Options,
    RowStats,
    admissible,
    class_row,
    finalize_rows,
    logit_gradient,
    make_options,
    one_hot,
    row_grad_coefficients,
    row_loss,
    row_status,
    safe_labels,
)
from jaxce._layout import ClassLayout, compute_dtype
from jaxce._reduction import reduce_loss
from jaxce._sigmoid import soft_cap, soft_cap_derivative

AxisName = Hashable  # a mesh axis name, or a tuple of them


# ---------------------------------------------------------------------------- mesh axes
def _axes(axis_name: AxisName) -> tuple:
    return axis_name if isinstance(axis_name, tuple) else (axis_name,)


def _varying(x: jax.Array) -> frozenset:
    """The manual mesh axes ``x`` varies over (its ``vma`` type under ``check_vma=True``)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)
    if mat is not None and hasattr(mat, "varying"):
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))


def _typed(axis_name: AxisName) -> bool:
    """Whether ``shard_map`` tracks how values vary (``check_vma=True``) for these axes."""
    index = jax.lax.axis_index(axis_name)
    return any(a in _varying(index) for a in _axes(axis_name))


def _sum_to(ct: jax.Array | None, primal: jax.Array | None) -> jax.Array | None:
    """A cotangent summed over the axes it varies over and ``primal`` does not.

    An input that is the same on every device of an axis (replicated) receives the sum of the
    devices' contributions; this is the transpose of JAX's implicit ``pvary``.
    """
    if ct is None or primal is None:
        return ct
    extra = _varying(ct) - _varying(primal)
    if extra:
        ct = jax.lax.psum(ct, tuple(extra))
    missing = _varying(primal) - _varying(ct)
    if missing:
        ct = jax.lax.pcast(ct, tuple(missing), to="varying")
    return ct


def _vary_like(tree, *refs):
    """``tree`` typed as varying over every axis any of ``refs`` varies over: the initial carry
    of a loop whose body mixes those inputs (a loop's carry keeps its type)."""
    axes = frozenset().union(*(_varying(r) for r in jax.tree.leaves(refs)))

    def vary(leaf):
        missing = tuple(axes - _varying(leaf))
        return jax.lax.pcast(leaf, missing, to="varying") if missing else leaf

    return jax.tree.map(vary, tree)


def _bound_axis_size(name: str, axis_name: AxisName) -> int:
    """The number of devices along ``axis_name``, with a helpful error when it is unbound."""
    try:
        return jax.lax.axis_size(axis_name)
    except NameError as err:
        raise ValueError(
            f"{name}={axis_name!r} is not a mesh axis bound here: call this function inside"
            " jax.shard_map over a mesh with that axis, or pass mesh= to have it call"
            " jax.shard_map for you."
        ) from err


# ------------------------------------------------------------------------- local columns
class _Static(NamedTuple):
    """Hashable settings of the per-shard rules (``nondiff_argnums``)."""

    ignore_index: int | None
    axis_name: AxisName  # the mesh axis (or axes) the vocabulary is split over
    vocab_size: int  # the global number of classes; later columns are padding


class _Shard(NamedTuple):
    """Where this device's columns sit in the global vocabulary, and its labels among them."""

    offset: jax.Array  # the global index of the first local column
    safe: jax.Array  # [...] global labels clamped into [0, vocab_size)
    in_range: jax.Array  # [...] whether each label was in range
    local: jax.Array  # [...] the label's local column, clamped into [0, cols)
    owner: jax.Array  # [..., 1] whether this device holds the label's column


def _shard(labels: jax.Array, cols: int, static: _Static) -> _Shard:
    offset = jax.lax.axis_index(static.axis_name).astype(labels.dtype) * cols
    safe, in_range = safe_labels(labels, static.vocab_size)
    local = safe - offset
    owner = (local >= 0) & (local < cols)
    return _Shard(offset, safe, in_range, jnp.clip(local, 0, cols - 1), owner[..., None])


def _vocab_mask(mask: jax.Array | None, shape, offset, static: _Static) -> jax.Array | None:
    """``mask`` and'ed with "this column is a class" when the vocabulary is padded."""
    cols = shape[-1]
    if static.vocab_size >= jax.lax.axis_size(static.axis_name) * cols:
        return mask
    columns = jax.lax.broadcasted_iota(
        offset.dtype, (1,) * (len(shape) - 1) + (cols,), len(shape) - 1
    )
    real = columns + offset < static.vocab_size
    return real if mask is None else mask & real


def _pick(v: jax.Array, shard: _Shard) -> jax.Array:
    """The label's entry of a local per-class vector ``v``, 0 on devices that do not own it."""
    picked = jnp.take(v, shard.local)[..., None]
    return jnp.where(shard.owner, picked, jnp.zeros_like(picked))


def _class_weight_cotangent(weights, shard: _Shard, per_label, spread) -> jax.Array:
    """``dloss/dw`` of the local class weights: each row's label term on the owning device,
    plus the smoothing term summed over rows (``spread``, ``[cols]``, or None)."""
    mine = jnp.where(shard.owner, per_label, jnp.zeros_like(per_label))
    grad = (
        jnp.zeros(weights.shape, per_label.dtype).at[shard.local.reshape(-1)].add(mine.reshape(-1))
    )
    return grad if spread is None else grad + spread


def _options_cotangent(options: Options, d_eps, d_zl) -> Options:
    # The soft cap is a fixed architectural constant, as in the single-device loss.
    cap = options.logit_soft_cap
    return Options(
        None
        if d_eps is None
        else _sum_to(d_eps.astype(options.label_smoothing.dtype), options.label_smoothing),
        None if d_zl is None else _sum_to(d_zl.astype(options.z_loss.dtype), options.z_loss),
        None if cap is None else jnp.zeros_like(cap),
    )


def _global_stats(parts: dict, m: jax.Array, static: _Static) -> tuple[RowStats, jax.Array | None]:
    """Sums the devices' partial row statistics (one all-reduce of a few ``[..., 1]`` arrays)
    into the global ``RowStats`` (shifted by the global max ``m``) and the label's class weight
    (None when unweighted)."""
    total = jax.lax.psum(parts, static.axis_name)
    log_sum = jnp.log(total["sum_exp"])  # log 0 = -inf: a row with no admissible class
    ones = jnp.ones_like(log_sum)
    count, weight_total, mean_logit = ones, ones, jnp.zeros_like(log_sum)
    if "count" in total:
        count, weight_total = total["count"], total["weight_total"]
        mean_logit = total["scaled_logit_sum"] * (static.vocab_size / jnp.maximum(count, 1))
    stats = RowStats(m, log_sum, total["label_logit"], count, weight_total, mean_logit)
    return stats, total.get("w_y")


def _global_max(local_max: jax.Array, static: _Static) -> jax.Array:
    """The row max over all shards, 0 where it is not finite (an empty row: its sum is 0)."""
    m = jax.lax.pmax(local_max, static.axis_name)
    return jnp.where(jnp.isfinite(m), m, jnp.zeros_like(m))


# ----------------------------------------------------------------------------------------------
# Local logits [..., cols] of a vocabulary split over static.axis_name. With global row stats
# (lse, z_y, K, W, mean_logit), loss as in _cross_entropy and, for the local columns,
#   dloss/dz_c = a p_c - b [c = y] - c w_c [c in A]      (row_grad_coefficients)
# which needs no communication. Residuals: the local logits (an input, alive anyway), labels,
# mask, weights and the float32 global row statistics (O(N)); probabilities are recomputed.
# Outputs: the per-example loss and what each example counts for in a mean (w_y if counted,
# else 0), which depends on the class weights and so has a cotangent of its own.
@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _sharded_ce(x, labels, mask, weights, options, static):
    return _sharded_ce_fwd(x, labels, mask, weights, options, static)[0]


def _capped(z: jax.Array, options: Options) -> jax.Array:
    return z if options.logit_soft_cap is None else soft_cap(z, options.logit_soft_cap)


def _sharded_ce_fwd(x, labels, mask, weights, options, static):
    dtype = compute_dtype(x.dtype)
    cols = x.shape[-1]
    shard = _shard(labels, cols, static)
    mask = _vocab_mask(mask, x.shape, shard.offset, static)
    z = _capped(x.astype(dtype), options)
    adm = admissible(z, mask)
    zero = jnp.zeros_like(z)
    neg_inf = jnp.full_like(z, -jnp.inf)
    m = _global_max(jnp.max(jnp.where(adm, z, neg_inf), axis=-1, keepdims=True), static)
    picked = jnp.take_along_axis(x, shard.local[..., None], axis=-1).astype(dtype)
    parts = {
        "sum_exp": jnp.sum(jnp.where(adm, jnp.exp(z - m), zero), axis=-1, keepdims=True),
        "label_logit": jnp.where(shard.owner, _capped(picked, options), jnp.zeros_like(picked)),
    }
    if weights is not None:
        parts["w_y"] = _pick(weights.astype(dtype), shard)
    if options.label_smoothing is not None:
        # Each term is divided by V before summing, so the sum cannot overflow.
        w = jnp.ones_like(z) if weights is None else class_row(weights, z)
        parts["count"] = jnp.sum(adm.astype(dtype), axis=-1, keepdims=True)
        parts["weight_total"] = jnp.sum(jnp.where(adm, w, zero), axis=-1, keepdims=True)
        parts["scaled_logit_sum"] = jnp.sum(
            jnp.where(adm, w * z / static.vocab_size, zero), axis=-1, keepdims=True
        )
    stats, w_y = _global_stats(parts, m, static)
    w_y = jnp.ones_like(stats.lse) if w_y is None else w_y
    active, poisoned = row_status(labels, shard.in_range, stats.lse, static.ignore_index)
    loss = finalize_rows(row_loss(stats, w_y, options), active, poisoned)
    counted = jnp.where(active, w_y, jnp.zeros_like(w_y))
    return (loss[..., 0], counted[..., 0]), (x, labels, mask, weights, options, stats, w_y)


def _invariant_cotangent(g: jax.Array, static: _Static) -> jax.Array:
    """The loss is the same on every device of the vocabulary axis; a cotangent typed as varying
    there carries one share per device, and the loss's cotangent is their sum."""
    extra = _varying(g) & set(_axes(static.axis_name))
    return jax.lax.psum(g, tuple(extra)) if extra else g


def _sharded_ce_bwd(static, res, cotangents):
    x, labels, mask, weights, options, stats, w_y = res
    g, g_counted = cotangents
    dtype = stats.lse.dtype
    shard = _shard(labels, x.shape[-1], static)
    mask = _vocab_mask(mask, x.shape, shard.offset, static)
    xf = x.astype(dtype)
    z = _capped(xf, options)
    adm = admissible(z, mask)
    active, poisoned = row_status(labels, shard.in_range, stats.lse, static.ignore_index)
    g = _invariant_cotangent(g.astype(dtype)[..., None], static)
    g = finalize_rows(g, active, poisoned)
    onehot = one_hot(shard.safe, z, shard.offset)
    coefficients = row_grad_coefficients(stats, w_y, options)
    dz = logit_gradient(z, adm, onehot, weights, stats, coefficients, g)
    if options.logit_soft_cap is not None:
        dz = dz * soft_cap_derivative(xf, options.logit_soft_cap)
    rows = _linear._Rows(shard.safe, w_y, active, poisoned)
    per_label, d_eps, d_zl = _linear._row_parameter_grads(stats, rows, options, g)
    d_weights = None
    if weights is not None:
        g_counted = _invariant_cotangent(g_counted.astype(dtype)[..., None], static)
        per_label = per_label + jnp.where(active, g_counted, jnp.zeros_like(g_counted))
        spread = None
        if options.label_smoothing is not None:
            gap = (stats.max - z) + stats.log_sum_or_zero()  # lse - z_c
            scale = options.label_smoothing / jnp.maximum(stats.count, 1) * g
            terms = jnp.where(adm, gap * scale, jnp.zeros_like(z))
            spread = jnp.sum(jnp.reshape(terms, (-1, z.shape[-1])), axis=0)
        d_weights = _class_weight_cotangent(weights, shard, per_label, spread)
        d_weights = _sum_to(d_weights.astype(weights.dtype), weights)
    return (
        _sum_to(dz.astype(x.dtype), x),
        None,
        None,
        d_weights,
        _options_cotangent(options, d_eps, d_zl),
    )


_sharded_ce.defvjp(_sharded_ce_fwd, _sharded_ce_bwd)


# ------------------------------------------------------------------------ shared checks
def _check_vocab_size(vocab_size, padded: int) -> int:
    """The global number of classes: ``padded`` (all columns of all shards) by default."""
    if vocab_size is None:
        return padded
    if not isinstance(vocab_size, numbers.Integral) or isinstance(vocab_size, bool):
        raise TypeError(f"vocab_size must be a positive int or None; got {vocab_size!r}.")
    if not 0 < vocab_size <= padded:
        raise ValueError(
            f"vocab_size must lie in [1, {padded}] (the columns of all shards together);"
            f" got {vocab_size}."
        )
    return int(vocab_size)


def _local_class_vector(name: str, x, cols: int, shards: int) -> jax.Array | None:
    """A per-class vector given as this device's slice: ``[cols]``, not the global ``[V]``."""
    if x is None:
        return None
    x = _checks.as_float_array(name, x)
    _checks.check_shape(
        name, x, (cols,), f"this device's slice of the [V] vector: {cols} of V={cols * shards}"
    )
    return x


def _reduce(losses, counted, reduction: str, data_axis_name) -> jax.Array:
    """``"none"``, ``"sum"`` or ``"mean"`` over the local tokens, and over ``data_axis_name``."""
    if reduction == "none":
        return losses
    total, denominator = jnp.sum(losses), jnp.sum(counted)
    if data_axis_name is not None:
        total, denominator = jax.lax.psum((total, denominator), data_axis_name)
    if reduction == "sum":
        return total
    return reduce_loss(total[None], "mean", denominator[None])


# ------------------------------------------------------------------------------ on a mesh
def _mesh_size(mesh, name: str, axis_name) -> int:
    if axis_name is None:
        return 1
    sizes = dict(mesh.shape)
    missing = [a for a in _axes(axis_name) if a not in sizes]
    if missing:
        raise ValueError(
            f"{name}={axis_name!r} names axes {missing} that the mesh does not have;"
            f" its axes are {tuple(sizes)}."
        )
    return math.prod(sizes[a] for a in _axes(axis_name))


def _place(x, mesh, spec: P):
    """``x`` laid out as ``spec`` over the mesh's explicit axes (``jax.shard_map`` requires it;
    it reshards over automatic axes itself, and ``jax.reshard`` accepts only explicit ones)."""
    explicit = {
        name
        for name, kind in zip(mesh.axis_names, mesh.axis_types, strict=True)
        if kind == jax.sharding.AxisType.Explicit
    }
    if x is None or not explicit:
        return x

    def keep(entry):
        names = tuple(a for a in _axes(entry) if a in explicit) if entry is not None else ()
        return None if not names else names[0] if len(names) == 1 else names

    return jax.reshard(x, NamedSharding(mesh, P(*(keep(e) for e in spec))))


def _hyperparameters(**values):
    """Splits hyperparameters into traced arrays (passed through ``shard_map`` replicated)
    and Python numbers (closed over, so a literal 0 still switches its term off)."""
    traced = {k: v for k, v in values.items() if isinstance(v, jax.Array)}
    static = {k: v for k, v in values.items() if k not in traced}
    return traced, static


def _padded_columns(v: int, shards: int) -> tuple[int, int]:
    cols = -(-v // shards)
    return cols, cols * shards - v


def _data_spec(name: str, shape, data_axis_name, data_shards: int):
    """The spec of a ``[batch, ...]`` array whose first axis is split over the data axis."""
    if data_axis_name is None or not shape:
        if data_axis_name is not None:
            raise ValueError(f"data_axis_name needs a batch axis to split; {name} has none.")
        return (None,) * len(shape)
    if shape[0] % data_shards:
        raise ValueError(
            f"{name}'s first axis ({shape[0]}) must divide evenly over data_axis_name="
            f"{data_axis_name!r} ({data_shards} devices); got shape {tuple(shape)}."
        )
    return (data_axis_name,) + (None,) * (len(shape) - 1)


def _loss_on_mesh(mesh, loss_fn, args: dict, specs: dict, hyperparameters: dict, **fixed):
    """``loss_fn`` under ``jax.shard_map`` over ``mesh``: traced hyperparameters travel as
    replicated arguments, the rest (and ``fixed``) are bound statically; the output is per
    example (laid out as the labels) for ``reduction="none"``, else a replicated scalar."""
    traced, constants = _hyperparameters(**hyperparameters)
    args, specs = {**args, **traced}, {**specs, **{k: P() for k in traced}}
    loss = functools.partial(loss_fn, **fixed, **constants)
    out_spec = specs["labels"] if fixed["reduction"] == "none" else P()
    return _call_on_mesh(mesh, loss, args, specs, out_spec)


def _call_on_mesh(mesh, fn, args: dict, specs: dict, out_spec):
    """``jax.shard_map(fn)`` over ``mesh`` for keyword arrays ``args`` laid out as ``specs``."""
    names = tuple(args)
    placed = tuple(_place(args[k], mesh, specs[k]) for k in names)
    in_specs = tuple(specs[k] for k in names)

    def body(*values):
        return fn(**dict(zip(names, values, strict=True)))

    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_spec)(*placed)


# -------------------------------------------------------------------------- logits
def softmax_cross_entropy_with_integer_labels(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    axis_name: AxisName,
    data_axis_name: AxisName | None = None,
    mesh: jax.sharding.Mesh | None = None,
    where: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = None,
    class_weights: jax.typing.ArrayLike | None = None,
    label_smoothing: float | jax.typing.ArrayLike = 0.0,
    z_loss: float | jax.typing.ArrayLike = 0.0,
    logit_soft_cap: float | jax.typing.ArrayLike | None = None,
    vocab_size: int | None = None,
    reduction: str = "none",
) -> jax.Array:
    r"""Integer-label softmax cross-entropy of logits whose vocabulary is split over devices.

    The loss of :func:`jaxce.softmax_cross_entropy_with_integer_labels`, with every option and
    the same value and gradients, for logits ``[..., V]`` whose class axis is split over the
    mesh axis ``axis_name`` (each device holds ``V / P`` consecutive columns, as
    ``PartitionSpec(..., axis_name)`` lays them out). Per example, with the statistics taken over
    the *global* vocabulary (smoothing and z-loss included):

    .. math::
        \ell_i = (1-\varepsilon)\, w_y (\mathrm{lse}(z) - z_y)
          + \frac{\varepsilon}{K} \sum_{c \in A} w_c (\mathrm{lse}(z) - z_c)
          + \lambda_z\, w_y\, \mathrm{lse}(z)^2

    Devices exchange only per-example numbers: an all-reduce (max) of ``N`` floats and one
    all-reduce (sum) of ``2N`` floats (``3N`` with class weights, ``+3N`` with label
    smoothing); the backward pass is local to each device. Every device of ``axis_name``
    returns the same loss.

    Two ways to call it:

    * inside ``jax.shard_map`` (``mesh=None``): ``logits`` is this device's block
      ``[..., V/P]``, ``labels`` its examples' *global* class indices (the same on every device
      of ``axis_name``), and per-class arrays (``class_weights``, a per-class ``where``) are
      this device's slices, like the logits. Use JAX's default ``check_vma=True``, under
      which gradients of inputs replicated over an axis are summed over it.
    * under ``jax.jit`` on global arrays (``mesh=`` given): this function calls
      ``jax.shard_map`` itself, with ``logits`` laid out ``P(data_axis_name, ..., axis_name)``
      and ``labels`` ``P(data_axis_name)``; per-class arrays are global ``[V]``. A vocabulary
      that does not divide over the devices is padded to a multiple of ``P`` here (padding
      columns are excluded from the loss). Pass arrays already laid out that way, or XLA moves
      them.

    Args:
      logits: ``[..., V/P]`` floating-point logits of this device's columns (global ``[..., V]``
        with ``mesh``); the class axis is the last one. Any float dtype; computed in float32.
      labels: integer global class indices, the logits' shape without the class axis.
      axis_name: the mesh axis (or tuple of axes) the vocabulary is split over.
      data_axis_name: the mesh axis (or axes) the examples are split over, if any: ``"sum"``
        and ``"mean"`` then reduce over all devices' examples (a global mean) and every device
        returns the same number. ``None``: reduce over this device's examples only.
      mesh: a ``jax.sharding.Mesh`` to call ``jax.shard_map`` over (see above); ``None`` when
        already inside ``jax.shard_map``.
      where: optional boolean mask of admissible classes, broadcastable to ``logits`` (local
        columns inside ``shard_map``), or of the labels' shape (one flag per example).
      ignore_index: label value that marks an example to skip (loss 0, gradient 0, not
        counted in a mean).
      class_weights: optional class weights: this device's ``[V/P]`` slice inside
        ``shard_map``, the global ``[V]`` vector with ``mesh``.
      label_smoothing: :math:`\varepsilon \in [0, 1]`, spread over the global admissible
        vocabulary.
      z_loss: :math:`\lambda_z \ge 0` (PaLM), on the global logsumexp.
      logit_soft_cap: optional positive cap applied before the softmax (Gemma 2).
      vocab_size: the global number of classes ``V`` when the vocabulary is padded: columns
        with a global index ``>= vocab_size`` are not classes and take no part in the loss.
        Default: all columns of all devices (``P * V/P``; with ``mesh``, ``logits.shape[-1]``).
      reduction: ``"none"`` (per example), ``"sum"`` or ``"mean"`` (the sum divided by the
        summed class weights of the counted examples, as PyTorch; 0 if there are none).

    Returns:
      The loss in ``result_type(logits.dtype, float32)``, identical on every device of
      ``axis_name``: per example for ``"none"``, else a scalar. A label outside
      ``[0, vocab_size)`` that is not ``ignore_index`` gives NaN for that example.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxce.sharded
      >>> from jax.sharding import PartitionSpec as P
      >>> mesh = jax.make_mesh((1, jax.device_count()), ("data", "model"))
      >>> logits = jnp.array([[2.0, 1.0, 0.1, -1.0], [0.5, 2.5, 0.3, 0.0]])
      >>> labels = jnp.array([0, 1])
      >>> jax.jit(lambda z, y: jaxce.sharded.softmax_cross_entropy_with_integer_labels(
      ...     z, y, axis_name="model", data_axis_name="data", mesh=mesh,
      ...     reduction="mean"))(logits, labels)
      Array(0.36657763, dtype=float32)
      >>> def per_device(local_logits, labels):  # inside shard_map: local columns
      ...     return jaxce.sharded.softmax_cross_entropy_with_integer_labels(
      ...         local_logits, labels, axis_name="model", label_smoothing=0.1)
      >>> f = jax.shard_map(per_device, mesh=mesh, in_specs=(P(None, "model"), P()),
      ...                   out_specs=P())
      >>> split = jax.device_put(logits, jax.sharding.NamedSharding(mesh, P(None, "model")))
      >>> bool(jnp.allclose(f(split, labels), jaxce.softmax_cross_entropy_with_integer_labels(
      ...     logits, labels, label_smoothing=0.1)))
      True

    References:
      Shoeybi et al., "Megatron-LM", 2019 (vocabulary-parallel cross-entropy); PyTorch
      ``cross_entropy``; JAX ``shard_map``.
    """
    if mesh is not None:
        return _ce_on_mesh(
            mesh,
            logits,
            labels,
            axis_name=axis_name,
            data_axis_name=data_axis_name,
            where=where,
            ignore_index=ignore_index,
            class_weights=class_weights,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            logit_soft_cap=logit_soft_cap,
            vocab_size=vocab_size,
            reduction=reduction,
        )
    logits = _checks.as_float_array("logits", logits)
    labels = _checks.as_int_array("labels", labels)
    _checks.check_reduction(reduction)
    _checks.check_ignore_index(ignore_index)
    if logits.ndim < 1:
        raise ValueError(f"logits must have a class axis [..., V/P]; got shape {logits.shape}.")
    _checks.check_shape(
        "labels", labels, logits.shape[:-1], f"logits shape {logits.shape} without the class axis"
    )
    shards = _bound_axis_size("axis_name", axis_name)
    if data_axis_name is not None:
        _bound_axis_size("data_axis_name", data_axis_name)
    cols = logits.shape[-1]
    static = _Static(ignore_index, axis_name, _check_vocab_size(vocab_size, shards * cols))
    weights = _local_class_vector("class_weights", class_weights, cols, shards)
    layout = ClassLayout(logits.shape, (logits.ndim - 1,))
    mask = layout.mask_to_last("where", where)
    options = make_options(compute_dtype(logits.dtype), label_smoothing, z_loss, logit_soft_cap)
    losses, counted = _sharded_ce(logits, labels, mask, weights, options, static)
    return _reduce(losses, counted, reduction, data_axis_name)


def _class_mask_on_mesh(where, logits_shape, pad: int, model_spec, logits_spec, labels_spec):
    """A ``where`` for global logits, with its spec: per class (``[V]``, split like the
    vocabulary), per example (split like the labels) or full (split like the logits)."""
    where = _checks.as_bool_array("where", where)
    batch = logits_shape[:-1]
    batch_none = (None,) * len(batch)
    if where.ndim == len(batch) and where.ndim != len(logits_shape):
        return where, labels_spec  # one flag per example (optax's convention)
    _checks.check_broadcastable("where", where, logits_shape, "or the labels' shape")
    if all(s == 1 for s in where.shape[:-1]) and where.shape[-1:] == logits_shape[-1:]:
        # One row of flags for every example: kept as [1, ..., 1, V], split like the columns.
        where = jnp.reshape(where, (1,) * len(batch) + logits_shape[-1:])
        return jnp.pad(where, [(0, 0)] * len(batch) + [(0, pad)]), P(*batch_none, model_spec)
    where = jnp.broadcast_to(where, logits_shape)
    return jnp.pad(where, [(0, 0)] * len(batch) + [(0, pad)]), logits_spec


def _ce_on_mesh(
    mesh,
    logits,
    labels,
    *,
    axis_name,
    data_axis_name,
    where,
    class_weights,
    label_smoothing,
    z_loss,
    logit_soft_cap,
    vocab_size,
    reduction,
    ignore_index,
):
    logits = _checks.as_float_array("logits", logits)
    labels = _checks.as_int_array("labels", labels)
    _checks.check_reduction(reduction)
    if logits.ndim < 1:
        raise ValueError(f"logits must have a class axis [..., V]; got shape {logits.shape}.")
    _checks.check_shape(
        "labels", labels, logits.shape[:-1], f"logits shape {logits.shape} without the class axis"
    )
    shards = _mesh_size(mesh, "axis_name", axis_name)
    data_shards = _mesh_size(mesh, "data_axis_name", data_axis_name)
    v = logits.shape[-1]
    vocab_size = _check_vocab_size(vocab_size, v)
    cols, pad = _padded_columns(v, shards)
    batch_spec = _data_spec("labels", labels.shape, data_axis_name, data_shards)
    args = {
        "logits": jnp.pad(logits, [(0, 0)] * labels.ndim + [(0, pad)]) if pad else logits,
        "labels": labels,
    }
    specs = {"logits": P(*batch_spec, axis_name), "labels": P(*batch_spec)}
    if class_weights is not None:
        weights = _checks.class_vector("class_weights", class_weights, v)
        args["class_weights"], specs["class_weights"] = jnp.pad(weights, (0, pad)), P(axis_name)
    if where is not None:
        args["where"], specs["where"] = _class_mask_on_mesh(
            where, logits.shape, pad, axis_name, specs["logits"], specs["labels"]
        )
    return _loss_on_mesh(
        mesh,
        softmax_cross_entropy_with_integer_labels,
        args,
        specs,
        dict(label_smoothing=label_smoothing, z_loss=z_loss, logit_soft_cap=logit_soft_cap),
        axis_name=axis_name,
        data_axis_name=data_axis_name,
        ignore_index=ignore_index,
        vocab_size=vocab_size,
        reduction=reduction,
    )


# ----------------------------------------------------------------------------------------------
# Fused: logits x @ w + bias with w's columns split over static.axis_name, never materialized.
# Each device runs the blockwise kernels of _linear on its columns: the forward pass merges
# [token_chunk, vocab_chunk] blocks into local row statistics (online logsumexp), which are
# combined across devices as above; the backward pass recomputes each block and
#   dz = g dloss/dz (local columns),  dx = dz w^T (summed over devices: x is shared by all
#   columns), dw = x^T dz and dbias = sum_i dz (local).
# Residuals: the inputs (alive anyway) and the float32 global row statistics (O(N)).
class _FusedStatic(NamedTuple):
    core: _Static
    token_chunk: int
    vocab_chunk: int


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _sharded_linear(x, w, bias, labels, weights, options, static):
    return _sharded_linear_fwd(x, w, bias, labels, weights, options, static)[0]


def _local_labels(shard: _Shard) -> jax.Array:
    """Each row's label as a local column, or -1 (matching no column) on other devices."""
    return jnp.where(shard.owner[..., 0], shard.local, jnp.full_like(shard.local, -1))


def _sharded_linear_fwd(x, w, bias, labels, weights, options, static):
    core = static.core
    dtype = _linear._compute_dtype(x, w)
    shard = _shard(labels, w.shape[1], core)
    smoothing = options.label_smoothing is not None
    local = _linear._local_statistics(
        x,
        w,
        bias,
        _local_labels(shard),
        weights,
        options,
        static,
        dtype,
        core.vocab_size,
        lambda tree: _vary_like(tree, x, w, bias, weights, labels),
    )
    # The local statistics are merged across devices like blocks: the local sums shifted from
    # the local max to the global one by exp(max_local - max) <= 1 (0 for an empty shard).
    m = _global_max(local.max, core)
    label_logit = _linear._label_logits(x, w, bias, shard.local, options, dtype)
    parts = {
        "sum_exp": local.sum_exp * jnp.exp(local.max - m),
        "label_logit": jnp.where(shard.owner, label_logit, jnp.zeros_like(label_logit)),
    }
    if weights is not None:
        parts["w_y"] = _pick(weights.astype(dtype), shard)
    if smoothing:
        parts["count"], parts["weight_total"] = local.count, local.weight_total
        parts["scaled_logit_sum"] = local.scaled_logit_sum
    stats, w_y = _global_stats(parts, m, core)
    w_y = jnp.ones_like(stats.lse) if w_y is None else w_y
    active, poisoned = row_status(labels, shard.in_range, stats.lse, core.ignore_index)
    loss = finalize_rows(row_loss(stats, w_y, options), active, poisoned)
    counted = jnp.where(active, w_y, jnp.zeros_like(w_y))
    residuals = (x, w, bias, labels, weights, options, stats, w_y)
    return (loss[:, 0], counted[:, 0]), residuals


def _sharded_linear_bwd(static, res, cotangents):
    x, w, bias, labels, weights, options, stats, w_y = res
    core = static.core
    g, g_counted = cotangents
    dtype = stats.lse.dtype
    cols = w.shape[1]
    shard = _shard(labels, cols, core)
    active, poisoned = row_status(labels, shard.in_range, stats.lse, core.ignore_index)
    g = finalize_rows(_invariant_cotangent(g.astype(dtype)[:, None], core), active, poisoned)
    rows = _linear._Rows(_local_labels(shard), w_y, active, poisoned)
    smooth_weights = weights is not None and options.label_smoothing is not None
    dx, dw, db, dwt = _linear._block_gradients(
        x,
        w,
        bias,
        weights,
        options,
        static,
        stats,
        rows,
        g,
        dtype,
        lambda tree: _vary_like(tree, *res, g),
    )
    per_label, d_eps, d_zl = _linear._row_parameter_grads(stats, rows, options, g)
    d_weights = None
    if weights is not None:
        g_counted = _invariant_cotangent(g_counted.astype(dtype)[:, None], core)
        per_label = per_label + jnp.where(active, g_counted, jnp.zeros_like(g_counted))
        d_weights = _class_weight_cotangent(
            weights, shard, per_label, dwt if smooth_weights else None
        )
        d_weights = _sum_to(d_weights.astype(weights.dtype), weights)
    dx = dx.astype(x.dtype)
    # dx sums over all columns of all devices: the tensor-parallel all-reduce of N x D numbers.
    dx = _sum_to(dx, x) if _typed(core.axis_name) else jax.lax.psum(dx, core.axis_name)
    return (
        dx,
        _sum_to(dw, w),
        None if bias is None else _sum_to(db.astype(bias.dtype), bias),
        None,
        d_weights,
        _options_cotangent(options, d_eps, d_zl),
    )


_sharded_linear.defvjp(_sharded_linear_fwd, _sharded_linear_bwd)


def _padding_bias(bias, cols: int, static: _Static, dtype) -> jax.Array | None:
    """The local bias with ``-inf`` on padding columns (global index ``>= vocab_size``): a
    ``-inf`` logit is no class, so padding never enters a statistic. Outside the custom rule,
    so the bias's gradient flows through the select."""
    if static.vocab_size >= jax.lax.axis_size(static.axis_name) * cols:
        return bias
    offset = jax.lax.axis_index(static.axis_name) * cols
    real = jax.lax.iota(offset.dtype, cols) + offset < static.vocab_size
    base = jnp.zeros((cols,), dtype) if bias is None else bias
    return jnp.where(real, base, jnp.full_like(base, -jnp.inf))


def linear_softmax_cross_entropy(
    x: jax.typing.ArrayLike,
    w: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    axis_name: AxisName,
    data_axis_name: AxisName | None = None,
    mesh: jax.sharding.Mesh | None = None,
    bias: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = None,
    class_weights: jax.typing.ArrayLike | None = None,
    label_smoothing: float | jax.typing.ArrayLike = 0.0,
    z_loss: float | jax.typing.ArrayLike = 0.0,
    logit_soft_cap: float | jax.typing.ArrayLike | None = None,
    vocab_size: int | None = None,
    reduction: str = "mean",
    token_chunk: int | None = None,
    vocab_chunk: int | None = None,
) -> jax.Array:
    r"""Cross-entropy of the logits ``x @ w + bias`` with ``w``'s columns split over devices.

    The loss of :func:`jaxce.linear_softmax_cross_entropy` (and of
    :func:`jaxce.softmax_cross_entropy_with_integer_labels` on ``x @ w + bias``), every option
    included, for an output projection ``w`` ``[D, V]`` whose vocabulary is split over the mesh
    axis ``axis_name`` (tensor parallelism; each device holds ``[D, V/P]``). No device forms its
    ``[N, V/P]`` block of logits: each computes its columns' row statistics block by block
    (``token_chunk`` x ``vocab_chunk``), and the devices exchange ``O(N)`` numbers, as
    :func:`softmax_cross_entropy_with_integer_labels` of this module does. The backward pass
    recomputes the blocks (8NDV/P FLOPs per device); ``dw`` and ``dbias`` stay on their device,
    and ``dx`` is summed over ``axis_name`` (an all-reduce of ``N x D`` numbers, the inherent
    cost of tensor parallelism).

    .. math::
        \ell_i = (1-\varepsilon)\, w_y (\mathrm{lse}(z) - z_y)
          + \frac{\varepsilon}{K} \sum_{c \in A} w_c (\mathrm{lse}(z) - z_c)
          + \lambda_z\, w_y\, \mathrm{lse}(z)^2, \qquad z = \mathrm{cap}(x_i w + b)

    Inside ``jax.shard_map`` (``mesh=None``): ``x`` is this device's tokens ``[..., D]`` (the
    same on every device of ``axis_name``), ``w`` its ``[D, V/P]`` columns, ``bias`` and
    ``class_weights`` its ``[V/P]`` slices; use ``check_vma=True`` (the default). With ``mesh``:
    global arrays, laid out ``x`` ``P(data_axis_name)``, ``w`` ``P(None, axis_name)``,
    ``bias``/``class_weights`` ``P(axis_name)``; a vocabulary that does not divide over the
    devices is padded with excluded columns.

    Args:
      x: ``[..., D]`` floating-point activations.
      w: ``[D, V/P]`` this device's columns of the projection (global ``[D, V]`` with ``mesh``).
      labels: integer global class indices, ``x.shape[:-1]``.
      axis_name: the mesh axis (or axes) the vocabulary is split over.
      data_axis_name: the mesh axis (or axes) the tokens are split over, if any: ``"sum"`` and
        ``"mean"`` then reduce over all tokens of all devices.
      mesh: a ``jax.sharding.Mesh`` to call ``jax.shard_map`` over; ``None`` inside it.
      bias: optional output bias, sliced like ``w``'s columns (a ``-inf`` entry removes a
        class).
      ignore_index: label value that marks a token to skip.
      class_weights: optional class weights, sliced like ``w``'s columns (global ``[V]`` with
        ``mesh``).
      label_smoothing: :math:`\varepsilon \in [0, 1]`, over the global vocabulary.
      z_loss: :math:`\lambda_z \ge 0`, on the global logsumexp.
      logit_soft_cap: optional positive cap applied to the logits.
      vocab_size: the global number of classes when ``w`` has padding columns (those with a
        global index ``>= vocab_size`` are excluded). Default: all columns.
      reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
      token_chunk: rows per block (default per backend, as the single-device loss).
      vocab_chunk: columns per block (default per backend).

    Returns:
      The loss in float32 (float64 for float64 inputs), identical on every device of
      ``axis_name``: a scalar, or per token for ``reduction="none"``.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxce, jaxce.sharded
      >>> mesh = jax.make_mesh((1, jax.device_count()), ("data", "model"))
      >>> x = jax.random.normal(jax.random.key(0), (8, 16))
      >>> w = jax.random.normal(jax.random.key(1), (16, 96)) / 4
      >>> labels = jnp.arange(8)
      >>> loss = jax.jit(lambda x, w: jaxce.sharded.linear_softmax_cross_entropy(
      ...     x, w, labels, axis_name="model", data_axis_name="data", mesh=mesh))(x, w)
      >>> unfused = jaxce.softmax_cross_entropy_with_integer_labels(x @ w, labels, reduction="mean")
      >>> bool(jnp.allclose(loss, unfused, rtol=1e-5))
      True

    References:
      Shoeybi et al., "Megatron-LM", 2019 (vocabulary-parallel cross-entropy); Wijmans et al.,
      "Cut Your Losses in Large-Vocabulary Language Models", 2024 (blockwise logits).
    """
    if mesh is not None:
        return _linear_on_mesh(
            mesh,
            x,
            w,
            labels,
            axis_name=axis_name,
            data_axis_name=data_axis_name,
            bias=bias,
            ignore_index=ignore_index,
            class_weights=class_weights,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            logit_soft_cap=logit_soft_cap,
            vocab_size=vocab_size,
            reduction=reduction,
            token_chunk=token_chunk,
            vocab_chunk=vocab_chunk,
        )
    x, w, labels = _linear.check_linear_arguments(x, w, labels, reduction, ignore_index)
    shards = _bound_axis_size("axis_name", axis_name)
    if data_axis_name is not None:
        _bound_axis_size("data_axis_name", data_axis_name)
    d, cols = w.shape
    core = _Static(ignore_index, axis_name, _check_vocab_size(vocab_size, shards * cols))
    if bias is not None:
        bias = _local_class_vector("bias", bias, cols, shards)
    weights = _local_class_vector("class_weights", class_weights, cols, shards)
    dtype = _linear._compute_dtype(x, w)
    options = make_options(dtype, label_smoothing, z_loss, logit_soft_cap)
    batch_shape = labels.shape
    x2, labels1 = jnp.reshape(x, (-1, d)), jnp.reshape(labels, (-1,))
    n = x2.shape[0]
    default_rows, default_cols, _ = _linear._DEFAULTS.get(
        jax.default_backend(), _linear._DEFAULTS["gpu"]
    )
    static = _FusedStatic(
        core,
        _linear._chunk_size("token_chunk", token_chunk, default_rows, max(n, 1)),
        _linear._chunk_size("vocab_chunk", vocab_chunk, default_cols, cols),
    )
    bias = _padding_bias(bias, cols, core, dtype)
    if n == 0:
        losses = counted = jnp.zeros((0,), dtype)
    else:
        losses, counted = _sharded_linear(x2, w, bias, labels1, weights, options, static)
    return _reduce(jnp.reshape(losses, batch_shape), counted, reduction, data_axis_name)


def _linear_on_mesh(
    mesh,
    x,
    w,
    labels,
    *,
    axis_name,
    data_axis_name,
    bias,
    class_weights,
    label_smoothing,
    z_loss,
    logit_soft_cap,
    vocab_size,
    reduction,
    ignore_index,
    token_chunk,
    vocab_chunk,
):
    x, w, labels = _linear.check_linear_arguments(x, w, labels, reduction, ignore_index)
    shards = _mesh_size(mesh, "axis_name", axis_name)
    data_shards = _mesh_size(mesh, "data_axis_name", data_axis_name)
    v = w.shape[1]
    vocab_size = _check_vocab_size(vocab_size, v)
    cols, pad = _padded_columns(v, shards)
    batch_spec = _data_spec("labels", labels.shape, data_axis_name, data_shards)
    args = {"x": x, "w": jnp.pad(w, ((0, 0), (0, pad))) if pad else w, "labels": labels}
    specs = {"x": P(*batch_spec, None), "w": P(None, axis_name), "labels": P(*batch_spec)}
    for name, vector in (("bias", bias), ("class_weights", class_weights)):
        if vector is not None:
            vector = _checks.class_vector(name, vector, v)
            args[name], specs[name] = jnp.pad(vector, (0, pad)), P(axis_name)
    return _loss_on_mesh(
        mesh,
        linear_softmax_cross_entropy,
        args,
        specs,
        dict(label_smoothing=label_smoothing, z_loss=z_loss, logit_soft_cap=logit_soft_cap),
        axis_name=axis_name,
        data_axis_name=data_axis_name,
        ignore_index=ignore_index,
        vocab_size=vocab_size,
        reduction=reduction,
        token_chunk=token_chunk,
        vocab_chunk=vocab_chunk,
    )
