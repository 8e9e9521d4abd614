"""Independent float64 references for the jaxce losses.

Every function here is written from the specification (the README's Semantics section, PyTorch
and optax documentation), never from jaxce. Each takes an ``xp`` argument: ``numpy`` (the default)
gives float64 values; ``jax.numpy`` (with x64 enabled) gives the same formula as a plain,
un-customised JAX function whose autodiff gradients serve as the reference gradients.

Only the straightforward formulas are used: the max-subtracted logsumexp, ``0 * log 0 = 0``; no
custom derivatives, no chunking.
"""

from __future__ import annotations

import decimal

import numpy as np

F64 = np.float64


def _asarray(xp, x, dtype=F64):
    return xp.asarray(x, dtype=dtype)


def _to_last(xp, x, axis):
    """Moves the class axis (int or tuple) of ``x`` to the end, flattening a tuple of axes."""
    ndim = x.ndim
    if isinstance(axis, int):
        return xp.moveaxis(x, axis % ndim, -1)
    axes = tuple(a % ndim for a in axis)
    batch = tuple(a for a in range(ndim) if a not in axes)
    x = xp.transpose(x, batch + axes)
    return xp.reshape(x, x.shape[: len(batch)] + (-1,))


def _class_shape_removed(shape, axis):
    ndim = len(shape)
    axes = (axis,) if isinstance(axis, int) else axis
    axes = {a % ndim for a in axes}
    return tuple(s for i, s in enumerate(shape) if i not in axes)


def _prep_where(xp, where, logits_shape, axis):
    """Returns ``where`` as a bool array of logits' shape with the class axes last (flattened)."""
    if where is None:
        return True
    where = xp.asarray(where, dtype=bool)
    if where.ndim != len(logits_shape):  # optax: `where` of the batch shape, one flag per example
        where = xp.expand_dims(where, axis)
    where = xp.broadcast_to(where, logits_shape)
    return _to_last(xp, where, axis)


def _lse_last(xp, z, adm, keepdims=False):
    """logsumexp over the last axis restricted to ``adm``; -inf for an empty row."""
    neg_inf = _asarray(xp, -np.inf)
    zm = xp.where(adm, z, neg_inf)
    m = xp.max(zm, axis=-1, keepdims=True)
    m_safe = xp.where(xp.isfinite(m), m, _asarray(xp, 0.0))
    if xp is not np:
        import jax

        m_safe = jax.lax.stop_gradient(m_safe)
    e = xp.where(adm, xp.exp(xp.where(adm, z, m_safe) - m_safe), _asarray(xp, 0.0))
    s = xp.sum(e, axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        out = xp.log(s) + m_safe
    return out if keepdims else out[..., 0]


# --------------------------------------------------------------------------------------------
# primitives


def logsumexp(x, axis=-1, where=None, xp=np):
    x = _asarray(xp, x)
    z = _to_last(xp, x, axis)
    adm = _prep_where(xp, where, x.shape, axis) & (z > -np.inf)
    return _lse_last(xp, z, adm)


def log_softmax(x, axis=-1, where=None, xp=np):
    """log softmax keeping the shape of ``x``; int axis only. -inf at excluded entries."""
    x = _asarray(xp, x)
    w = (
        xp.ones(x.shape, bool)
        if where is None
        else xp.broadcast_to(xp.asarray(where, dtype=bool), x.shape)
    )
    z = xp.moveaxis(x, axis, -1)
    adm = xp.moveaxis(w, axis, -1) & (z > -np.inf)
    lse = _lse_last(xp, z, adm, keepdims=True)
    out = xp.where(
        adm, z - xp.where(xp.isfinite(lse), lse, _asarray(xp, 0.0)), _asarray(xp, -np.inf)
    )
    return xp.moveaxis(out, -1, axis)


def softmax(x, axis=-1, where=None, xp=np):
    ls = log_softmax(x, axis=axis, where=where, xp=xp)
    return xp.exp(ls)


def sigmoid(x, xp=np):
    x = _asarray(xp, x)
    # two-branch form, exact at both tails
    with np.errstate(over="ignore"):
        pos = 1.0 / (1.0 + xp.exp(-xp.abs(x)))
    return xp.where(x >= 0, pos, 1.0 - pos)


def log_sigmoid(x, xp=np):
    x = _asarray(xp, x)
    # log sigmoid(x) = -softplus(-x) = min(x, 0) - log1p(exp(-|x|))
    return xp.minimum(x, 0.0) - xp.log1p(xp.exp(-xp.abs(x)))


def logit_soft_cap(x, cap, xp=np):
    x = _asarray(xp, x)
    return cap * xp.tanh(x / cap)


def logit_soft_cap_second_derivatives(u: float, cap: float) -> tuple[float, float, float]:
    """``d2/dx2``, ``d2/dx dcap`` and ``d2/dcap2`` of ``cap * tanh(x / cap)`` at
    ``u = x / cap``: ``-2 tanh(u) / cosh(u)**2 / cap``, ``-u`` times that and ``u**2`` times
    it, in 60-digit decimal arithmetic (``tanh`` and ``1 / cosh**2`` from ``e = exp(-2 |u|)``,
    which cancel nowhere)."""
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        d = decimal.Decimal(u)
        e = (-2 * abs(d)).exp()
        tanh = (1 - e) / (1 + e) * (1 if d >= 0 else -1)
        slope = -2 * tanh * 4 * e / (1 + e) ** 2 / decimal.Decimal(cap)
        return float(slope), float(-d * slope), float(d * d * slope)


def soft_capped_cross_entropy_hessian(x, label: int, cap: float, eps: float, zl: float):
    """The second derivatives of one row's integer-label loss on soft-capped logits,
    ``L = lse(z) - sum_j q_j z_j + zl lse(z)**2``, ``z = cap tanh(x / cap)``,
    ``q = (1 - eps) onehot(label) + eps / C``, in ``x`` (``[C, C]``), in ``x`` and the cap
    (``[C]``) and in the cap (a number), each with its scale: the same sums of terms with every
    term's absolute value, which bounds what rounding the terms leaves (an entry may cancel). In
    60-digit decimal arithmetic, ``tanh`` and ``1 / cosh**2`` from ``exp(-2 |u|)``, which cancel
    nowhere; returned as float64 arrays ``(h_xx, s_xx, h_xc, s_xc, h_cc, s_cc)``.

    With ``g = dL/dz``, ``G = d2L/dz2``, ``s = dz/dx``, ``c = dz/dcap``:
    ``h_xx = s_i G_ij s_j + [i = j] g_i d2z_i/dx2``,
    ``h_xc = s_i sum_j G_ij c_j + g_i d2z_i/dx dcap``,
    ``h_cc = sum_ij c_i G_ij c_j + sum_i g_i d2z_i/dcap2``."""
    D = decimal.Decimal
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        k = D(cap)
        n = len(x)
        u = [D(float(v)) / k for v in x]
        e = [(-2 * abs(a)).exp() for a in u]
        t = [(1 - b) / (1 + b) * (1 if a >= 0 else -1) for a, b in zip(u, e, strict=True)]
        s = [4 * b / (1 + b) ** 2 for b in e]
        z = [k * a for a in t]
        top = max(z)
        ez = [(a - top).exp() for a in z]
        total = sum(ez)
        lse = top + total.ln()
        p = [a / total for a in ez]
        q = [(1 - D(eps)) * (j == label) + D(eps) / n for j in range(n)]
        zl_ = D(zl)
        g = [p[j] - q[j] + 2 * zl_ * lse * p[j] for j in range(n)]
        g_abs = [p[j] + q[j] + 2 * zl_ * abs(lse) * p[j] for j in range(n)]

        def hz(i, j, absolute=False):  # d2L/dz_i dz_j, or the sum of its terms' magnitudes
            sign, lse_ = (1, abs(lse)) if absolute else (-1, lse)
            diag = p[i] if i == j else D(0)
            return (diag + sign * p[i] * p[j]) * (1 + 2 * zl_ * lse_) + 2 * zl_ * p[i] * p[j]

        xx = [-2 * t[j] * s[j] / k for j in range(n)]  # d2z/dx2
        xc = [-u[j] * xx[j] for j in range(n)]  # d2z/dx dcap
        cc = [u[j] * u[j] * xx[j] for j in range(n)]  # d2z/dcap2
        c = [t[j] - u[j] * s[j] for j in range(n)]  # dz/dcap
        c_abs = [abs(t[j]) + abs(u[j]) * s[j] for j in range(n)]
        h_xx = [
            [s[i] * hz(i, j) * s[j] + (g[i] * xx[i] if i == j else 0) for j in range(n)]
            for i in range(n)
        ]
        s_xx = [
            [
                s[i] * hz(i, j, True) * s[j] + (g_abs[i] * abs(xx[i]) if i == j else 0)
                for j in range(n)
            ]
            for i in range(n)
        ]
        h_xc = [s[i] * sum(hz(i, j) * c[j] for j in range(n)) + g[i] * xc[i] for i in range(n)]
        s_xc = [
            s[i] * sum(hz(i, j, True) * c_abs[j] for j in range(n)) + g_abs[i] * abs(xc[i])
            for i in range(n)
        ]
        h_cc = sum(c[i] * hz(i, j) * c[j] for i in range(n) for j in range(n))
        h_cc += sum(g[i] * cc[i] for i in range(n))
        s_cc = sum(c_abs[i] * hz(i, j, True) * c_abs[j] for i in range(n) for j in range(n))
        s_cc += sum(g_abs[i] * abs(cc[i]) for i in range(n))

        def f64(v):
            return np.array(v, dtype=object).astype(np.float64)

        return f64(h_xx), f64(s_xx), f64(h_xc), f64(s_xc), float(h_cc), float(s_cc)


# --------------------------------------------------------------------------------------------
# reductions


def _reduce(xp, loss, reduction, denom=None):
    if reduction == "none":
        return loss
    total = xp.sum(loss)
    if reduction == "sum":
        return total
    assert reduction == "mean"
    if denom is None:
        denom = _asarray(xp, loss.size)
    safe = xp.where(denom == 0, _asarray(xp, 1.0), denom)
    return xp.where(denom == 0, _asarray(xp, 0.0), total / safe)


# --------------------------------------------------------------------------------------------
# cross-entropies


def softmax_cross_entropy_with_integer_labels(
    logits,
    labels,
    axis=-1,
    where=None,
    ignore_index=None,
    class_weights=None,
    label_smoothing=0.0,
    z_loss=0.0,
    logit_soft_cap_value=None,
    reduction="none",
    xp=np,
):
    logits = _asarray(xp, logits)
    labels = np.asarray(labels) if xp is np else xp.asarray(labels)
    z = _to_last(xp, logits, axis)
    if logit_soft_cap_value is not None:
        c = logit_soft_cap_value
        z = xp.where(z > -np.inf, c * xp.tanh(z / c), z)
    num_classes = z.shape[-1]
    adm = _prep_where(xp, where, logits.shape, axis) & (z > -np.inf)
    k = xp.sum(adm, axis=-1).astype(F64)
    w = xp.ones((num_classes,), F64) if class_weights is None else _asarray(xp, class_weights)
    lse = _lse_last(xp, z, adm)
    in_range = (labels >= 0) & (labels < num_classes)
    ignored = xp.zeros(labels.shape, bool) if ignore_index is None else labels == ignore_index
    y = xp.where(in_range, labels, 0)
    z_y = xp.take_along_axis(z, y[..., None], axis=-1)[..., 0]
    w_y = w[y]
    has = k > 0
    lse_safe = xp.where(has, lse, _asarray(xp, 0.0))
    nll = lse_safe - z_y
    eps = label_smoothing
    loss = (1.0 - eps) * w_y * nll
    if eps:
        # each term divided by K before the weight multiplies it: w (lse - z) alone can
        # overflow float64 where the mean over the classes does not
        gap = (lse_safe[..., None] - xp.where(adm, z, 0.0)) / xp.where(has, k, 1.0)[..., None]
        per_class = xp.where(adm, w * gap, 0.0)
        loss = loss + eps * xp.sum(per_class, axis=-1)
    if z_loss:
        loss = loss + z_loss * w_y * lse_safe**2
    keep = has & ~ignored
    loss = xp.where(keep, loss, _asarray(xp, 0.0))
    loss = xp.where(in_range | ignored, loss, _asarray(xp, np.nan))
    n = xp.where(keep, w_y, _asarray(xp, 0.0))
    return _reduce(xp, loss, reduction, xp.sum(n))


def softmax_cross_entropy(
    logits,
    labels,
    axis=-1,
    where=None,
    label_smoothing=0.0,
    class_weights=None,
    reduction="none",
    xp=np,
):
    logits = _asarray(xp, logits)
    labels = _asarray(xp, labels)
    z = _to_last(xp, logits, axis)
    y = _to_last(xp, labels, axis)
    num_classes = z.shape[-1]
    adm = _prep_where(xp, where, logits.shape, axis) & (z > -np.inf)
    k = xp.sum(adm, axis=-1, keepdims=True).astype(F64)
    w = xp.ones((num_classes,), F64) if class_weights is None else _asarray(xp, class_weights)
    lse = _lse_last(xp, z, adm, keepdims=True)
    lse_safe = xp.where(k > 0, lse, 0.0)
    logp = xp.where(adm, z, 0.0) - lse_safe
    eps = label_smoothing
    yp = (1.0 - eps) * y + eps / xp.where(k > 0, k, 1.0)
    term = xp.where(adm & (yp != 0), w * yp * logp, 0.0)
    loss = -xp.sum(term, axis=-1)
    return _reduce(xp, loss, reduction, _asarray(xp, loss.size))


def nll_loss(
    log_probs, labels, axis=-1, ignore_index=None, class_weights=None, reduction="none", xp=np
):
    lp = _to_last(xp, _asarray(xp, log_probs), axis)
    labels = np.asarray(labels) if xp is np else xp.asarray(labels)
    num_classes = lp.shape[-1]
    w = xp.ones((num_classes,), F64) if class_weights is None else _asarray(xp, class_weights)
    in_range = (labels >= 0) & (labels < num_classes)
    ignored = xp.zeros(labels.shape, bool) if ignore_index is None else labels == ignore_index
    y = xp.where(in_range, labels, 0)
    lp_y = xp.take_along_axis(lp, y[..., None], axis=-1)[..., 0]
    w_y = w[y]
    loss = xp.where(ignored, 0.0, -w_y * lp_y)
    loss = xp.where(in_range | ignored, loss, np.nan)
    n = xp.where(ignored, 0.0, w_y)
    return _reduce(xp, loss, reduction, xp.sum(n))


def sigmoid_binary_cross_entropy(
    logits, labels, pos_weight=None, weights=None, label_smoothing=0.0, reduction="none", xp=np
):
    x = _asarray(xp, logits)
    y = _asarray(xp, labels)
    y = (1.0 - label_smoothing) * y + label_smoothing / 2.0
    pw = 1.0 if pos_weight is None else _asarray(xp, pos_weight)
    # y * log sigmoid(x) with 0 * -inf = 0 (x = -inf, y = 0)
    ls_pos = log_sigmoid(x, xp=xp)
    ls_neg = log_sigmoid(-x, xp=xp)
    a = xp.where(y == 0, 0.0, pw * y * ls_pos)
    b = xp.where(y == 1, 0.0, (1.0 - y) * ls_neg)
    loss = -(a + b)
    if weights is not None:
        loss = _asarray(xp, weights) * loss
    loss = xp.broadcast_to(loss, x.shape)
    return _reduce(xp, loss, reduction)


def binary_cross_entropy(probs, labels, weights=None, reduction="none", xp=np):
    p = _asarray(xp, probs)
    y = _asarray(xp, labels)
    with np.errstate(divide="ignore"):
        lp = xp.maximum(xp.log(p), -100.0)
        l1p = xp.maximum(xp.log(1.0 - p), -100.0)
    loss = -(y * lp + (1.0 - y) * l1p)
    if weights is not None:
        loss = _asarray(xp, weights) * loss
    loss = xp.broadcast_to(loss, p.shape)
    return _reduce(xp, loss, reduction)


# --------------------------------------------------------------------------------------------
# information


def entropy(probs, axis=-1, xp=np):
    p = _asarray(xp, probs)
    safe = xp.where(p > 0, p, 1.0)
    return -xp.sum(xp.where(p > 0, p * xp.log(safe), 0.0), axis=axis)


def softmax_entropy(logits, axis=-1, xp=np):
    x = _asarray(xp, logits)
    ls = log_softmax(x, axis=axis, xp=xp)
    p = xp.exp(ls)
    return -xp.sum(xp.where(p > 0, p * xp.where(p > 0, ls, 0.0), 0.0), axis=axis)


def kl_divergence(log_predictions, targets, axis=-1, where=None, xp=np):
    lq = _asarray(xp, log_predictions)
    t = _asarray(xp, targets)
    safe = xp.where(t > 0, t, 1.0)
    terms = xp.where(t == 0, 0.0, t * (xp.log(safe) - lq))
    if where is not None:
        terms = xp.where(xp.asarray(where, dtype=bool), terms, 0.0)
    return xp.sum(terms, axis=axis)


# --------------------------------------------------------------------------------------------
# focal


def sigmoid_focal_loss(logits, labels, alpha=None, gamma=2.0, reduction="none", xp=np):
    x = _asarray(xp, logits)
    y = _asarray(xp, labels)
    p = sigmoid(x, xp=xp)
    ce = sigmoid_binary_cross_entropy(x, y, xp=xp)
    one_minus_pt = y * (1.0 - p) + (1.0 - y) * p
    loss = ce * one_minus_pt**gamma
    if alpha is not None:
        loss = (alpha * y + (1.0 - alpha) * (1.0 - y)) * loss
    return _reduce(xp, loss, reduction)


def softmax_focal_loss(
    logits, labels, alpha=None, gamma=2.0, axis=-1, ignore_index=None, reduction="none", xp=np
):
    z = _to_last(xp, _asarray(xp, logits), axis)
    labels = np.asarray(labels) if xp is np else xp.asarray(labels)
    num_classes = z.shape[-1]
    ls = log_softmax(z, axis=-1, xp=xp)
    in_range = (labels >= 0) & (labels < num_classes)
    ignored = xp.zeros(labels.shape, bool) if ignore_index is None else labels == ignore_index
    y = xp.where(in_range, labels, 0)
    lp_y = xp.take_along_axis(ls, y[..., None], axis=-1)[..., 0]
    p_y = xp.exp(lp_y)
    if alpha is None:
        a = 1.0
    elif np.ndim(alpha) == 0:
        a = alpha
    else:
        a = _asarray(xp, alpha)[y]
    loss = -a * (1.0 - p_y) ** gamma * lp_y
    loss = xp.where(ignored, 0.0, loss)
    loss = xp.where(in_range | ignored, loss, np.nan)
    n = xp.sum(xp.where(ignored, 0.0, 1.0))
    return _reduce(xp, loss, reduction, n)


def softmax_hessian(x):
    """Analytic Hessian of softmax for a vector x: d^2 s_i / dx_j dx_k."""
    s = softmax(np.asarray(x, F64))
    eye = np.eye(len(s))
    # ds_i/dx_j = s_i (delta_ij - s_j)
    # d^2 s_i/dx_j dx_k = s_i (d_ik - s_k)(d_ij - s_j) - s_i s_j (d_jk - s_k)
    a = eye - s[None, :]  # a[i, k] = d_ik - s_k
    h = (
        s[:, None, None] * a[:, None, :] * a[:, :, None]
        - (s[:, None] * s[None, :])[:, :, None] * a[None, :, :]
    )
    return h


def jax_ref(fn, *args, **kwargs):
    """Calls reference ``fn`` with ``xp=jax.numpy`` under permissive promotion (test-only code).

    The references broadcast freely; the suite's strict promotion settings are meant for jaxce.
    """
    import jax
    import jax.numpy as jnp

    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
        return fn(*args, xp=jnp, **kwargs)


def ref_grad(fn, argnums=0):
    """Gradient (jax autodiff, float64) of a scalar-valued reference ``fn(*args, xp=...)``."""
    import jax
    import jax.numpy as jnp

    def g(*args, **kwargs):
        with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
            args = [jnp.asarray(a) for a in args]
            return jax.jit(jax.grad(lambda *a: fn(*a, xp=jnp, **kwargs), argnums=argnums))(*args)

    return g


def jgrad(fn, argnums=0):
    """``jax.jit(jax.grad(fn))``: compiled once per call site, much faster than eager on CPU."""
    import jax

    return jax.jit(jax.grad(fn, argnums=argnums))


def jitted(fn):
    """Calls ``fn`` through ``jax.jit``: array arguments traced, other keywords static.

    Users call the losses under jit; it also keeps the suite fast (eager dispatch compiles every
    primitive separately). Eager calls are exercised in test_checks, test_softmax and the docs.
    """
    import functools

    import jax

    @functools.wraps(fn)
    def call(*args, **kwargs):
        arrays = {k: v for k, v in kwargs.items() if isinstance(v, (jax.Array, np.ndarray))}
        static = {k: v for k, v in kwargs.items() if k not in arrays}
        return jax.jit(lambda a, k: fn(*a, **k, **static))(args, arrays)

    return call


# --------------------------------------------------------------------------------------------
# test helpers (not references)


def fused_of_logits(logits, labels, **kw):
    """``linear_softmax_cross_entropy`` of exactly these logits, per example: x = the logits and
    w = I, so x @ w = logits (a NaN stays in its row; -inf logits need the bias instead)."""
    import jax.numpy as jnp

    import jaxce

    logits = jnp.asarray(logits)
    c = logits.shape[-1]
    return jaxce.linear_softmax_cross_entropy(
        logits, jnp.eye(c, dtype=logits.dtype), labels, reduction="none", **kw
    )


def assert_close(actual, expected, rtol=1e-10, atol=1e-12, err_msg=""):
    """``assert_allclose`` in float64 that treats NaN == NaN and requires equal infinities."""
    a = np.asarray(np.asarray(actual, dtype=np.float32) if _is_low(actual) else actual, F64)
    e = np.asarray(expected, F64)
    np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, equal_nan=True, err_msg=err_msg)


def _is_low(x):
    return str(getattr(x, "dtype", "")) in ("bfloat16", "float16")


def random_logits(rng, shape, scale=3.0):
    return rng.normal(scale=scale, size=shape).astype(F64)


def random_probs(rng, shape, axis=-1):
    p = rng.gamma(1.0, size=shape)
    return p / p.sum(axis=axis, keepdims=True)


def check_grads(f, args, **kwargs):
    """``jax.test_util.check_grads`` on ``jax.jit(f)`` (same derivatives, compiled once)."""
    import jax
    import jax.test_util

    return jax.test_util.check_grads(jax.jit(f), args, **kwargs)
