"""Cross-entropy over a vocabulary sharded across devices (tensor parallelism).

Each device holds ``V / P`` columns of the logits (or of the output projection ``w``) and the
full rows of its tokens. The loss needs only per-row statistics of the whole vocabulary, so the
devices exchange ``O(N)`` numbers, never the logits: each computes its columns'
``_rows.Partial`` statistics, rebases them onto the global row max (``pmax``) and sums them
(``psum``) with the label's logit (and class weight) from the device that owns the label's
column. Label smoothing and the z-loss so use the *global* vocabulary (smoothing over the local
shard only is a classic Megatron bug). The global statistics then go through the same
``_rows`` kernel as the single-device loss, so there is one formula.

Derivatives. The logits loss and the reduced fused loss are ``jax.custom_jvp`` rules (see
``_autodiff``): their tangent is a sum over each device's columns, ``psum``-ed over the
vocabulary axis, and JAX transposes it for reverse mode, including the sums over mesh axes that
the gradient of a replicated input needs (``x`` of the fused loss over the vocabulary axis,
``w`` over the data axis): this follows the types of ``jax.shard_map(check_vma=True)``, JAX's
default, and, without types (``check_vma=False``), JAX's own sums. The per-token fused loss
(``reduction="none"``) is a ``jax.custom_vjp`` whose backward rule sums those cotangents itself
(``_loops.sum_to``), or, without types, the shares of its own cotangent that JAX hands each
device (``_invariant_cotangent``).

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
from jax.sharding import PartitionSpec as P

from jaxce import _autodiff, _blocks, _checks, _labels, _mesh, _rows, _xla
from jaxce._layout import compute_dtype, per_example_mask
from jaxce._loops import sum_to, varying, varying_like
from jaxce._mesh import axes_of
from jaxce._reduction import reduce_loss

AxisName = Hashable  # a mesh axis name, or a tuple of them


# ---------------------------------------------------------------------------- mesh axes
def _typed(axis_name: AxisName) -> bool:
    """Whether ``shard_map`` tracks how values vary (``check_vma=True``) for these axes."""
    index = jax.lax.axis_index(axis_name)
    return any(a in varying(index) for a in axes_of(axis_name))


def _check_axis_names(axis_name: object, data_axis_name: object) -> None:
    """Each a mesh axis name (a string or other hashable) or a tuple of them, and no axis named
    by both: the vocabulary and the tokens cannot be split over the same devices."""
    for name, value in (("axis_name", axis_name), ("data_axis_name", data_axis_name)):
        if not isinstance(value, Hashable):
            raise TypeError(
                f"{name} must be a mesh axis name or a tuple of them; got"
                f" {type(value).__name__} {value!r}"
                + (f" (use the tuple {tuple(value)!r})" if isinstance(value, list) else "")
                + "."
            )
    if data_axis_name is None:
        return
    both = [a for a in axes_of(axis_name) if a in axes_of(data_axis_name)]
    if both:
        raise ValueError(
            f"axis_name={axis_name!r} and data_axis_name={data_axis_name!r} must name different"
            f" mesh axes (the classes and the examples are split over different devices); both"
            f" name {both[0]!r}."
        )


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
    meaning: _labels.Labels  # the global labels' meaning (class_index in [0, vocab_size))
    local: jax.Array  # [...] the label's local column, clamped into [0, cols)
    owner: jax.Array  # [..., 1] whether this device holds the label's column

    def label_cols(self) -> jax.Array:
        """Each row's label as a local column, or -1 (matching no column) elsewhere."""
        return jnp.where(self.owner[..., 0], self.local, jnp.full_like(self.local, -1))


def _shard(labels: jax.Array, cols: int, static: _Static) -> _Shard:
    meaning = _labels.classify(labels, static.vocab_size, static.ignore_index)
    offset = jax.lax.axis_index(static.axis_name).astype(meaning.class_index.dtype) * cols
    local = meaning.class_index - offset
    owner = (local >= 0) & (local < cols)
    return _Shard(offset, meaning, jnp.clip(local, 0, cols - 1), owner[..., None])


def _vocab_mask(mask: jax.Array | None, shape, offset, static: _Static) -> jax.Array | None:
    """``mask`` and'ed with "this column is a class" when the vocabulary is padded."""
    cols = shape[-1]
    if static.vocab_size >= jax.lax.axis_size(static.axis_name) * cols:
        return mask
    columns = jax.lax.broadcasted_iota(
        offset.dtype, (1,) * (len(shape) - 1) + (cols,), len(shape) - 1
    )
    real = jnp.broadcast_to(columns + offset < static.vocab_size, shape)
    return real if mask is None else mask & real


def _owned(value: jax.Array, shard: _Shard) -> jax.Array:
    """A per-row value known only on the device that owns the label's column, on every device
    (an all-reduce of one number per row)."""
    return jnp.where(shard.owner, value, jnp.zeros_like(value))


def _pick(v: jax.Array, shard: _Shard) -> jax.Array:
    """The label's entry of a local per-class vector ``v``, 0 on devices that do not own it."""
    return _owned(jnp.take(v, shard.local)[..., None], shard)


def _global(local: _rows.Partial, owned: dict, static: _Static):
    """Global row statistics from each device's ``local`` ones: rebased onto the global max
    (``pmax``, the online-softmax step between devices) and summed, in one ``psum`` with the
    per-row values in ``owned`` (each nonzero on one device only).

    A row is NaN where its max is (``_rows.finish``), but ``pmax`` need not carry a NaN: XLA's
    CPU all-reduce drops it (the max of NaNs is -inf there), and a traced soft cap out of range,
    which makes every capped logit NaN and each device's sum of exponentials 0, made every row
    look empty (loss 0, gradient 0). So a device's NaN max also makes its sum NaN before the
    ``psum``, which keeps it whatever the backend."""
    nan_sum = jnp.where(jnp.isnan(local.max), jnp.nan, local.sum_exp)
    local = local._replace(sum_exp=nan_sum)
    # A shift, with no derivative (as _softmax.row_max): a derivative of the derivative rule
    # (jax.grad of jax.grad) would otherwise reach pmax, which has none.
    m = jax.lax.pmax(jax.lax.stop_gradient(local.max), static.axis_name)
    local = _rows.rebase(local, m, static.vocab_size)
    sums = {k: v for k, v in local._asdict().items() if k != "max" and v is not None}
    total = jax.lax.psum({**sums, **owned}, static.axis_name)
    merged = _rows.Partial(
        m,
        total["sum_exp"],
        total.get("num_admissible"),
        total.get("weight_total"),
        total.get("gap"),
    )
    return _rows.finish(merged, static.vocab_size), {k: total[k] for k in owned}


def _rows_of(stats, shard: _Shard, owned: dict, weights, options, dtype):
    label_logit = owned["label_logit"]
    w_y = jnp.ones_like(label_logit) if weights is None else owned["w_y"]
    rows = _rows.status(shard.meaning, stats)
    loss = _rows.finalize(_rows.row_loss(stats, label_logit, w_y, options), rows)
    counted = _rows.counted(w_y, rows)
    return loss[..., 0], counted[..., 0], label_logit, w_y, rows


# ----------------------------------------------------------------------------------------------
# Local logits [..., cols] of a vocabulary split over static.axis_name. With global row stats,
# the loss as in _rows and, for the local columns, dloss/dz = a p - b [c = y] - c w [c in A],
# which needs no communication. Outputs: the per-example loss and its counted weight.
@functools.partial(jax.custom_jvp, nondiff_argnums=(5,))
def _sharded_ce(x, labels, mask, weights, options, static):
    loss, counted, _ = _sharded_ce_forward(x, labels, mask, weights, options, static)
    return loss, counted


def _sharded_ce_forward(x, labels, mask, weights, options, static: _Static):
    dtype = compute_dtype(x.dtype)
    shard = _shard(labels, x.shape[-1], static)
    mask = _vocab_mask(mask, x.shape, shard.offset, static)
    local = _rows.row_stats(x, mask, weights, options, static.vocab_size, lambda p: p)
    picked = _rows.capped(
        jnp.take_along_axis(x, shard.local[..., None], axis=-1).astype(dtype), options
    )
    owned = {"label_logit": _owned(picked, shard)}
    if weights is not None:
        owned["w_y"] = _pick(weights.astype(dtype), shard)
    if mask is not None:
        label_mask = jnp.take_along_axis(mask, shard.local[..., None], axis=-1)
        owned["label_admissible"] = _owned(label_mask.astype(dtype), shard)
    stats, owned = _global(local, owned, static)
    owned["label_logit"] = _rows.label_logit_within(
        owned["label_logit"], stats, owned.get("label_admissible")
    )
    loss, counted, label_logit, w_y, rows = _rows_of(stats, shard, owned, weights, options, dtype)
    return loss, counted, (shard, mask, stats, label_logit, w_y, rows)


def _label_weight_tangent(dots: _rows.Tangents, shard: _Shard, dtype, axis_name):
    """The tangent of the label's class weight, from the device that owns its column."""
    if dots.weights is None:
        return None
    return jax.lax.psum(_pick(dots.weights.astype(dtype), shard), axis_name)


def _sharded_ce_jvp(static: _Static, primals, tangents):
    x, labels, mask, weights, options = primals
    x_dot, _, _, w_dot, o_dot = tangents
    loss, counted, (shard, mask, stats, label_logit, w_y, rows) = _sharded_ce_forward(
        x, labels, mask, weights, options, static
    )
    dots = _rows.tangents_of(x_dot, w_dot, o_dot, weights, options)
    t = None
    if dots.per_class(options):
        local = _rows.class_tangent(
            x, shard.label_cols(), mask, weights, options, stats, w_y, rows, dots
        )
        t = jax.lax.psum(local, static.axis_name)  # each device's columns' share
    w_y_dot = _label_weight_tangent(dots, shard, stats.shift.dtype, static.axis_name)
    derivs = _rows.row_derivatives(stats, label_logit, w_y, options)
    t, counted_dot = _rows.row_tangent(t, derivs, rows, w_y_dot, dots)
    return (loss, counted), (_autodiff.or_zeros(t, loss), _autodiff.or_zeros(counted_dot, counted))


_sharded_ce.defjvp(_sharded_ce_jvp, symbolic_zeros=True)


# ----------------------------------------------------------------------------------------------
# Fused: logits x @ w + bias with w's columns split over the vocabulary axis, never
# materialized. Each device runs the blockwise loops of _blocks on its columns; the local row
# statistics are combined across devices as above; then, from the global statistics,
#   dz = dloss/dz (local columns),  dx = dz w^T (summed over devices: x is shared by all
#   columns), dw = x^T dz and dbias = sum_i dz (local).
class _FusedStatic(NamedTuple):
    core: _Static
    blocks: _blocks.Static


def _sharded_linear_forward(x, w, bias, labels, weights, options, static: _FusedStatic):
    core = static.core
    dtype = _blocks.dtype_of(x, w)
    shard = _shard(labels, w.shape[1], core)

    vary = varying_like(x, w, bias, weights, labels)

    local = _blocks.statistics(x, w, bias, weights, options, static.blocks, dtype, vary)
    label_logit = _blocks.label_logits(x, w, bias, shard.local, options, dtype)
    owned = {"label_logit": _owned(label_logit, shard)}
    if weights is not None:
        owned["w_y"] = _pick(weights.astype(dtype), shard)
    stats, owned = _global(local, owned, core)
    owned["label_logit"] = _rows.label_logit_within(owned["label_logit"], stats)
    loss, counted, label_logit, w_y, rows = _rows_of(stats, shard, owned, weights, options, dtype)
    return loss, counted, (shard, stats, label_logit, w_y, rows), vary


def _local_gradients(x, w, bias, weights, options, static, parts, g, needs, vary, summed=False):
    """This device's gradients; ``summed``: the unscaled ones of a reduced loss, whose ``dw``
    is kept in ``_blocks.kept_dw_dtype``."""
    shard, stats, _, w_y, rows = parts
    info = _blocks.RowInfo(shard.label_cols(), w_y, rows, g)
    dtype = _blocks.dtype_of(x, w)
    return _blocks.gradients(
        x, w, bias, weights, options, static.blocks, stats, info, dtype, needs, vary, summed
    )


# Reduced ("mean", "sum"): the sum of the local tokens' losses and their counted weights. The
# unscaled gradients are computed in the forward rule (two passes, 8NDV/P FLOPs per device):
# reverse mode keeps them as its residuals.
@functools.partial(jax.custom_jvp, nondiff_argnums=(6,))
def _sharded_summed(x, w, bias, labels, weights, options, static: _FusedStatic):
    loss, counted, _, _ = _sharded_linear_forward(x, w, bias, labels, weights, options, static)
    return jnp.sum(loss), counted


def _sharded_summed_jvp(static: _FusedStatic, primals, tangents):
    x, w, bias, labels, weights, options = primals
    axis = static.core.axis_name
    dots = _blocks.dots_of(tangents, bias, weights, options)
    loss, counted, parts, vary = _sharded_linear_forward(
        x, w, bias, labels, weights, options, static
    )
    shard, stats, label_logit, w_y, rows = parts
    dtype = stats.shift.dtype
    ones = jnp.ones_like(w_y)
    grads = _local_gradients(
        x, w, bias, weights, options, static, parts, ones, dots.needs(options), vary, summed=True
    )
    # The terms over this device's columns, summed over the vocabulary axis; dx, whose rows
    # every device of that axis shares, summed before its contraction (the tensor-parallel
    # all-reduce of N x D numbers); then the per-row terms.
    local = _blocks.column_tangent(grads, dots, dtype)
    t = None if local is None else jax.lax.psum(local, axis)
    if grads.x is not None:
        t = _autodiff.add(t, _autodiff.contract(jax.lax.psum(grads.x, axis), dots.x, dtype))
    w_y_dot = _label_weight_tangent(dots.rows, shard, dtype, axis)
    parts = (stats, label_logit, w_y, rows)
    return _blocks.summed_outputs(loss, counted, t, parts, w_y_dot, dots, options)


_sharded_summed.defjvp(_sharded_summed_jvp, symbolic_zeros=True)


# Per token ("none"): residuals are the inputs and the global row statistics (O(N)); the
# backward rule computes each block again with the per-token cotangent.
@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _sharded_per_token(x, w, bias, labels, weights, options, static: _FusedStatic):
    loss, counted, _, _ = _sharded_linear_forward(x, w, bias, labels, weights, options, static)
    return loss, counted


def _sharded_per_token_fwd(x, w, bias, labels, weights, options, static):
    loss, counted, parts, _ = _sharded_linear_forward(x, w, bias, labels, weights, options, static)
    return (loss, counted), (x, w, bias, labels, weights, options, parts)


def _invariant_cotangent(g: jax.Array, static: _Static, typed: bool) -> jax.Array:
    """The loss is the same on every device of the vocabulary axis; a cotangent typed as varying
    there carries one share per device, and the loss's cotangent is their sum. Without types
    (``check_vma=False``) JAX hands each device a share of a replicated output's cotangent (and
    sums the cotangents of replicated inputs): the sum over the axis, again."""
    extra = varying(g) & set(axes_of(static.axis_name)) if typed else axes_of(static.axis_name)
    return jax.lax.psum(g, tuple(extra)) if extra else g


def _sharded_per_token_bwd(static: _FusedStatic, res, cotangents):
    x, w, bias, labels, weights, options, parts = res
    shard, stats, label_logit, w_y, rows = parts
    core = static.core
    dtype = stats.shift.dtype
    typed = _typed(core.axis_name)
    g, g_counted = (_invariant_cotangent(c.astype(dtype)[:, None], core, typed) for c in cotangents)
    needs = _blocks.Needs.every(bias, weights, options)

    vary = varying_like(*res, g)

    grads = _local_gradients(x, w, bias, weights, options, static, parts, g, needs, vary)
    per_label, d_eps, d_zl = _blocks.row_cotangents(
        stats, label_logit, w_y, rows, g, g_counted, weights is not None, options
    )
    d_weights = None
    if weights is not None:
        mine = jnp.where(shard.owner[:, 0], per_label, jnp.zeros_like(per_label))
        per_class = jnp.zeros(weights.shape, dtype).at[shard.local].add(mine)
        if grads.smoothing_weights is not None:
            per_class = per_class + grads.smoothing_weights
        d_weights = sum_to(per_class.astype(weights.dtype), weights)
    if not typed:
        # Computed alike on every device of the vocabulary axis, whose cotangents JAX sums
        # (check_vma=False): each device returns its share.
        share = 1 / jax.lax.axis_size(core.axis_name)
        d_eps, d_zl = (None if d is None else d * share for d in (d_eps, d_zl))
    d_eps = sum_to(d_eps, options.label_smoothing)
    d_zl = sum_to(d_zl, options.z_loss)
    # dx and d_cap sum over all columns of all devices (dx: the tensor-parallel all-reduce of
    # N x D numbers), here by type, JAX's own sum without types.
    d_cap = sum_to(grads.cap, options.logit_soft_cap)
    dx = sum_to(grads.x.astype(x.dtype), x)
    return (
        dx,
        sum_to(grads.w, w),
        None if bias is None else sum_to(grads.bias.astype(bias.dtype), bias),
        None,
        d_weights,
        _rows.Options(d_eps, d_zl, d_cap),
    )


_sharded_per_token.defvjp(_sharded_per_token_fwd, _sharded_per_token_bwd)


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


# ------------------------------------------------------------------------ shared checks
def _check_vocab_size(vocab_size, padded: int) -> int:
    """The global number of classes: ``padded`` (all columns of all shards) by default."""
    if vocab_size is None:
        return padded
    if not isinstance(vocab_size, numbers.Integral) or isinstance(vocab_size, bool):
        raise TypeError(f"vocab_size must be a positive int or None; got {vocab_size!r}.")
    value = int(vocab_size)
    if not 0 < value <= padded:
        raise ValueError(
            f"vocab_size must lie in [1, {padded}] (the columns of all shards together);"
            f" got {vocab_size}."
        )
    return value


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
def _mesh_size(mesh, name: str, axis_name, *, required: bool = False) -> int:
    """The number of devices along ``axis_name`` of ``mesh`` (1 for an optional None)."""
    if not isinstance(mesh, jax.sharding.Mesh | jax.sharding.AbstractMesh):
        raise TypeError(
            f"mesh must be a jax.sharding.Mesh (e.g. from jax.make_mesh); got {type(mesh).__name__}"
            f" {mesh!r}."
        )
    sizes = dict(mesh.shape)
    if axis_name is None:
        if required:
            raise ValueError(
                f"{name} must name the mesh axis the vocabulary is split over; got None. The"
                f" mesh's axes are {tuple(sizes)}."
            )
        return 1
    missing = [a for a in axes_of(axis_name) if a not in sizes]
    if missing:
        raise ValueError(
            f"{name}={axis_name!r} names axes {missing} that the mesh does not have;"
            f" its axes are {tuple(sizes)}."
        )
    return math.prod(sizes[a] for a in axes_of(axis_name))


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
            f"the first axis of {name} ({shape[0]}) must divide evenly over data_axis_name="
            f"{data_axis_name!r} ({data_shards} devices); got shape {tuple(shape)}."
        )
    return (data_axis_name,) + (None,) * (len(shape) - 1)


def _loss_on_mesh(mesh, loss_fn, args: dict, specs: dict, hyperparameters: dict, **fixed):
    """``loss_fn`` under ``jax.shard_map`` over ``mesh``: traced hyperparameters travel as
    replicated arguments, the rest (and ``fixed``) are bound statically; the output is per
    example (laid out as the labels) for ``reduction="none"``, else a replicated scalar."""
    # Checked here, where a concrete array is still concrete (inside shard_map it is traced,
    # and out of range it would only be NaN): the same ValueError as without a mesh.
    _rows.make_options(jnp.float32, **hyperparameters)
    traced, constants = _hyperparameters(**hyperparameters)
    args, specs = {**args, **traced}, {**specs, **{k: P() for k in traced}}
    loss = functools.partial(loss_fn, **fixed, **constants)
    out_spec = specs["labels"] if fixed["reduction"] == "none" else P()
    return _call_on_mesh(mesh, loss, args, specs, out_spec)


def _call_on_mesh(mesh, fn, args: dict, specs: dict, out_spec):
    """``jax.shard_map(fn)`` over ``mesh`` for keyword arrays ``args`` laid out as ``specs``."""
    names = tuple(args)
    placed = tuple(_mesh.place(args[k], mesh, specs[k]) for k in names)
    in_specs = tuple(specs[k] for k in names)

    def body(*values):
        return fn(**dict(zip(names, values, strict=True)))

    return _mesh.shard_mapped(body, mesh, in_specs, out_spec)(*placed)


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
      this device's slices, like the logits. Under JAX's default ``check_vma=True``,
      gradients of inputs replicated over an axis are summed over it by their types; with
      ``check_vma=False`` JAX sums them itself, and the gradients are the same.
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
      logit_soft_cap: optional cap in ``[2**-64, 2**64]`` applied before the softmax
        (Gemma 2); ``None`` or ``inf`` means no cap.
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
      >>> f = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(None, "model"), P()),
      ...                           out_specs=P()))  # jitted: one program, not one per operation
      >>> split = jax.device_put(logits, jax.sharding.NamedSharding(mesh, P(None, "model")))
      >>> bool(jnp.allclose(f(split, labels), jaxce.softmax_cross_entropy_with_integer_labels(
      ...     logits, labels, label_smoothing=0.1)))
      True

    References:
      Shoeybi et al., "Megatron-LM", 2019 (vocabulary-parallel cross-entropy); PyTorch
      ``cross_entropy``; JAX ``shard_map``.
    """
    _check_axis_names(axis_name, data_axis_name)
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
    layout, logits, labels, ignore_index, _ = _labels.prepare(
        "logits", logits, labels, axis=-1, ignore_index=ignore_index, reduction=reduction
    )
    shards = _bound_axis_size("axis_name", axis_name)
    if data_axis_name is not None:
        _bound_axis_size("data_axis_name", data_axis_name)
    cols = logits.shape[-1]
    static = _Static(ignore_index, axis_name, _check_vocab_size(vocab_size, shards * cols))
    weights = _local_class_vector("class_weights", class_weights, cols, shards)
    mask = layout.mask_to_last("where", where)
    options = _rows.make_options(
        compute_dtype(logits.dtype), label_smoothing, z_loss, logit_soft_cap
    )
    losses, counted = _sharded_ce(logits, labels, mask, weights, options, static)
    return _reduce(losses, counted, reduction, data_axis_name)


def _class_mask_on_mesh(where, logits_shape, pad: int, model_spec, logits_spec, labels_spec):
    """A ``where`` for global logits, with its spec: per class (``[V]``, split like the
    vocabulary), per example (split like the labels) or full (split like the logits)."""
    where = _checks.as_bool_array("where", where)
    batch = tuple(logits_shape[:-1])
    batch_none = (None,) * len(batch)
    flags = per_example_mask("where", where, batch, tuple(logits_shape))
    if flags is not None:
        return flags, labels_spec  # one flag per example (optax's convention)
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
    _, logits, labels, ignore_index, _ = _labels.prepare(
        "logits", logits, labels, axis=-1, ignore_index=ignore_index, reduction=reduction
    )
    shards = _mesh_size(mesh, "axis_name", axis_name, required=True)
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
# The fused loss on a mesh.
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
    ``class_weights`` its ``[V/P]`` slices (``check_vma`` on or off). With ``mesh``:
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
      logit_soft_cap: optional cap in ``[2**-64, 2**64]`` applied to the logits;
        ``None`` or ``inf`` means no cap.
      vocab_size: the global number of classes when ``w`` has padding columns (those with a
        global index ``>= vocab_size`` are excluded). Default: all columns.
      reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
      token_chunk: rows per block (default per backend, as the single-device loss).
      vocab_chunk: columns per block (default per backend, cut on CPU where D is large).

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
    _check_axis_names(axis_name, data_axis_name)
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
    x, w, labels, ignore_index = _blocks.check_arguments(x, w, labels, reduction, ignore_index)
    shards = _bound_axis_size("axis_name", axis_name)
    if data_axis_name is not None:
        _bound_axis_size("data_axis_name", data_axis_name)
    d, cols = w.shape
    core = _Static(ignore_index, axis_name, _check_vocab_size(vocab_size, shards * cols))
    if bias is not None:
        bias = _local_class_vector("bias", bias, cols, shards)
    weights = _local_class_vector("class_weights", class_weights, cols, shards)
    dtype = _blocks.dtype_of(x, w)
    options = _rows.make_options(dtype, label_smoothing, z_loss, logit_soft_cap)
    batch_shape = labels.shape
    x2, labels1 = jnp.reshape(x, (labels.size, d)), jnp.reshape(labels, (labels.size,))
    n = x2.shape[0]
    default_rows = _xla.chunk_defaults()[0]
    default_cols = _blocks.vocab_chunk_of_two_passes(d, dtype)
    static = _FusedStatic(
        core,
        _blocks.Static(
            ignore_index,
            _blocks.chunk_size("token_chunk", token_chunk, default_rows, max(n, 1)),
            _blocks.chunk_size("vocab_chunk", vocab_chunk, default_cols, cols),
            core.vocab_size,
        ),
    )
    bias = _padding_bias(bias, cols, core, dtype)
    if n == 0:
        losses = counted = jnp.zeros((0,), dtype)
        return _reduce(jnp.reshape(losses, batch_shape), counted, reduction, data_axis_name)
    if reduction == "none":
        losses, counted = _sharded_per_token(x2, w, bias, labels1, weights, options, static)
        return _reduce(jnp.reshape(losses, batch_shape), counted, reduction, data_axis_name)
    total, counted = _sharded_summed(x2, w, bias, labels1, weights, options, static)
    return _reduce(total[None], counted, reduction, data_axis_name)


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
    x, w, labels, ignore_index = _blocks.check_arguments(x, w, labels, reduction, ignore_index)
    shards = _mesh_size(mesh, "axis_name", axis_name, required=True)
    data_shards = _mesh_size(mesh, "data_axis_name", data_axis_name)
    v = w.shape[1]
    vocab_size = _check_vocab_size(vocab_size, v)
    cols, pad = _padded_columns(v, shards)
    batch_spec = _data_spec("labels", labels.shape, data_axis_name, data_shards)
    args = {"x": x, "w": jnp.pad(w, ((0, 0), (0, pad))) if pad else w, "labels": labels}
    specs = {"x": P(*batch_spec, None), "w": P(None, axis_name), "labels": P(*batch_spec)}
    for name, vector in (("bias", bias), ("class_weights", class_weights)):
        if vector is not None:
            vector = _checks.class_vector(name, vector, v, f"one entry per class, V={v}")
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
