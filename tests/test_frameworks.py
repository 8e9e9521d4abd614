"""Flax NNX, Flax Linen and Haiku models train with optax and jaxce losses on digits.

Each run is a small MLP on scikit-learn's 8x8 digits (1347 training, 450 held-out images) with
minibatches of 64 and a jitted step; a few seconds on a laptop CPU, compilation included.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("haiku")
pytest.importorskip("sklearn")

import jaxce  # noqa: E402
from jaxce import demo  # noqa: E402

# Stated accuracy on the held-out quarter of digits after EPOCHS epochs. A working model reaches
# about 0.97; a broken loss or gradient stays near chance (0.1).
MIN_ACCURACY = 0.93
EPOCHS = 10


@pytest.fixture(autouse=True)
def standard_promotion():
    """Standard dtype promotion for these tests, instead of conftest's strict setting.

    optax's Adam computes its bias correction as ``decay ** count`` (a Python float to an int32
    power), which strict promotion rejects; the strict setting is for jaxce's own arithmetic,
    which the unit tests check.
    """
    with jax.numpy_dtype_promotion("standard"):
        yield


@pytest.fixture(scope="module")
def digits() -> demo.Split:
    """The seeded train / held-out split, loaded once for the module."""
    return demo.load_digits_split(seed=0)


@pytest.mark.parametrize(
    "train", [demo.train_nnx, demo.train_linen, demo.train_haiku], ids=["nnx", "linen", "haiku"]
)
def test_framework_trains_with_softmax_cross_entropy(train, digits: demo.Split) -> None:
    """Each framework reaches the stated held-out accuracy with jaxce's softmax cross-entropy."""
    _, history = train(
        digits.x_train,
        digits.y_train,
        digits.x_test,
        digits.y_test,
        loss_fn=demo.softmax_loss,
        config=demo.TrainConfig(epochs=EPOCHS),
    )
    assert history.test_accuracy[-1] >= MIN_ACCURACY, history.test_accuracy
    assert history.train_loss[-1] < history.train_loss[0] / 5, history.train_loss
    assert np.all(np.isfinite(history.test_loss))


def _class_weighted(logits: jax.Array, labels: jax.Array) -> jax.Array:
    weights = np.linspace(0.5, 2.0, demo.NUM_CLASSES).astype(np.float32)
    return jaxce.softmax_cross_entropy_with_integer_labels(
        logits, labels, class_weights=weights, reduction="mean"
    )


LOSSES = {
    "label_smoothing": functools.partial(
        jaxce.softmax_cross_entropy_with_integer_labels, label_smoothing=0.1, reduction="mean"
    ),
    "class_weights": _class_weighted,
    "z_loss": functools.partial(
        jaxce.softmax_cross_entropy_with_integer_labels, z_loss=1e-3, reduction="mean"
    ),
    "focal": functools.partial(jaxce.softmax_focal_loss, gamma=2.0, reduction="mean"),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_nnx_trains_with_loss_options(name: str, digits: demo.Split) -> None:
    """The loss options used in notebook 5 still train an NNX model to the stated accuracy."""
    _, history = demo.train_nnx(
        digits.x_train,
        digits.y_train,
        digits.x_test,
        digits.y_test,
        loss_fn=LOSSES[name],
        config=demo.TrainConfig(epochs=EPOCHS),
    )
    assert history.test_accuracy[-1] >= MIN_ACCURACY, history.test_accuracy


def test_haiku_trains_multilabel_sigmoid(digits: demo.Split) -> None:
    """A multi-label sigmoid head (even / greater than 4 / prime) trains in Haiku."""
    _, history = demo.train_haiku(
        digits.x_train,
        demo.derived_labels(digits.y_train),
        digits.x_test,
        demo.derived_labels(digits.y_test),
        num_outputs=len(demo.LABEL_NAMES),
        loss_fn=demo.sigmoid_loss,
        predict_fn=demo.threshold_prediction,
        config=demo.TrainConfig(epochs=EPOCHS),
    )
    # exact match over the three labels; guessing the majority of each label gets about 0.2
    assert history.test_accuracy[-1] >= 0.9, history.test_accuracy


def test_nnx_parameters_pass_as_arrays() -> None:
    """A Flax NNX ``Param`` (the kernel of an ``nnx.Linear``, a learned class-weight vector)
    goes to jaxce as it is, as it goes to ``x @ kernel``: the same loss and gradient as its
    array."""
    from flax import nnx

    head = nnx.Linear(8, 5, rngs=nnx.Rngs(0))
    h = jax.random.normal(jax.random.key(1), (6, 8))
    labels = jax.numpy.array([0, 1, 2, 3, 4, 0])
    weights = nnx.Param(jax.numpy.linspace(0.5, 1.5, 5))
    fused = jaxce.linear_softmax_cross_entropy(
        h, head.kernel, labels, class_weights=weights, reduction="mean"
    )
    plain = jaxce.linear_softmax_cross_entropy(
        h, head.kernel[...], labels, class_weights=weights[...], reduction="mean"
    )
    assert float(fused) == float(plain)

    @nnx.grad
    def grad(model: nnx.Linear):
        return jaxce.linear_softmax_cross_entropy(h, model.kernel, labels, reduction="mean")

    expected = jax.grad(
        lambda w: jaxce.linear_softmax_cross_entropy(h, w, labels, reduction="mean")
    )(head.kernel[...])
    np.testing.assert_allclose(grad(head).kernel[...], expected, rtol=1e-6)
