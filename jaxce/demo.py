"""Train small classifiers on scikit-learn's handwritten digits with jaxce losses.

This module backs ``python -m jaxce`` and is importable by the notebooks and tests. It needs the
``[examples]`` extra (flax, dm-haiku, scikit-learn, matplotlib, tqdm). Nothing is downloaded: the
8x8 digits data set ships with scikit-learn.

The building blocks:

* :func:`load_digits_split` -- a stratified, seeded train / held-out split, pixels scaled to [0, 1].
* :func:`derived_labels` -- three non-exclusive labels per digit (even, greater than 4, prime), a
  multi-label task made from the same images.
* :func:`imbalanced_subset` -- drop most examples of some classes, for the class-weights example.
* :func:`train_nnx`, :func:`train_linen`, :func:`train_haiku` -- the same MLP and minibatch loop in
  Flax NNX, Flax Linen and Haiku, trained with optax and any ``loss_fn(logits, labels)``.
* :func:`run_demo` -- what ``python -m jaxce`` prints: multi-class softmax, multi-label sigmoid and
  the two-class case done both ways.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen, nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import jaxce

LossFn = Callable[[jax.Array, jax.Array], jax.Array]
"""``loss_fn(logits, labels) -> scalar``: the training objective, e.g. a jaxce loss with
``reduction="mean"``."""

PredictFn = Callable[[jax.Array], jax.Array]
"""``predict_fn(logits) -> predictions`` of the labels' shape and dtype, for accuracy."""

LABEL_NAMES: tuple[str, ...] = ("even", "greater than 4", "prime")
"""Names of the columns of :func:`derived_labels`."""

NUM_CLASSES = 10
NUM_FEATURES = 64


@dataclasses.dataclass(frozen=True)
class Split:
    """A train / held-out split of the digits data.

    Attributes:
      x_train: ``[n_train, 64]`` float32 pixels in [0, 1].
      y_train: ``[n_train]`` int32 digit labels in [0, 10).
      x_test: ``[n_test, 64]`` float32 pixels in [0, 1].
      y_test: ``[n_test]`` int32 digit labels in [0, 10).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@dataclasses.dataclass
class History:
    """Per-epoch metrics of one training run.

    Attributes:
      train_loss: mean training loss over each epoch's minibatches.
      test_loss: loss on the whole held-out set after each epoch.
      test_accuracy: held-out accuracy after each epoch (exact match over all labels of an
        example, for multi-label tasks).
      seconds: wall-clock time of the run, compilation included.
    """

    train_loss: list[float] = dataclasses.field(default_factory=list)
    test_loss: list[float] = dataclasses.field(default_factory=list)
    test_accuracy: list[float] = dataclasses.field(default_factory=list)
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------------
# Data


def load_digits_split(*, seed: int = 0, test_size: float = 0.25) -> Split:
    """Loads scikit-learn's 8x8 handwritten digits and splits them, stratified by class.

    Args:
      seed: seed of the shuffle before splitting.
      test_size: fraction of the 1797 images held out.

    Returns:
      A :class:`Split`; with the defaults 1347 training and 450 held-out images.
    """
    images, digits = load_digits(return_X_y=True)
    x = (images / 16.0).astype(np.float32)  # pixel intensities are 0..16
    y = digits.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_size, random_state=seed, stratify=y
    )
    return Split(x_train, y_train, x_test, y_test)


def derived_labels(digits: np.ndarray) -> np.ndarray:
    """Three non-exclusive yes/no labels per digit: even, greater than 4, prime.

    A digit can be several at once (6 is even and greater than 4; 2 is even and prime), so this is
    a multi-label task: one sigmoid per column, not a softmax across columns.

    Args:
      digits: ``[n]`` integer digits in [0, 10).

    Returns:
      ``[n, 3]`` float32 array of 0s and 1s, columns named by :data:`LABEL_NAMES`.
    """
    digits = np.asarray(digits)
    even = digits % 2 == 0
    greater_than_4 = digits > 4
    prime = np.isin(digits, (2, 3, 5, 7))
    return np.stack([even, greater_than_4, prime], axis=-1).astype(np.float32)


def imbalanced_subset(
    x: np.ndarray,
    y: np.ndarray,
    *,
    rare_classes: Sequence[int] = (0, 1, 2, 3, 4),
    keep_fraction: float = 0.1,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Keeps only ``keep_fraction`` of the examples of ``rare_classes`` (at least one each).

    Args:
      x: ``[n, ...]`` inputs.
      y: ``[n]`` integer labels.
      rare_classes: the classes to thin out.
      keep_fraction: fraction of each rare class to keep, in (0, 1].
      seed: seed of the choice of kept examples.

    Returns:
      ``(x_subset, y_subset)``, the kept examples in their original order.
    """
    rng = np.random.default_rng(seed)
    keep = np.ones(len(y), dtype=bool)
    for c in rare_classes:
        (members,) = np.nonzero(y == c)
        n_keep = max(1, round(keep_fraction * len(members)))
        dropped = rng.permutation(members)[n_keep:]
        keep[dropped] = False
    return x[keep], y[keep]


def minibatches(
    num_examples: int, batch_size: int, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """Yields shuffled index batches of exactly ``batch_size``; the remainder is dropped.

    Equal batch shapes mean a jitted step compiles once.

    Args:
      num_examples: size of the data set.
      batch_size: examples per batch; clipped to ``num_examples``.
      rng: numpy generator that shuffles, so runs are reproducible given its seed.

    Yields:
      ``[batch_size]`` int arrays of example indices.
    """
    batch_size = min(batch_size, num_examples)
    order = rng.permutation(num_examples)
    for start in range(0, num_examples - batch_size + 1, batch_size):
        yield order[start : start + batch_size]


# ------------------------------------------------------------------------------------------------
# Losses and predictions for the demo's tasks


def softmax_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy with integer labels (multi-class, one answer per example)."""
    return jaxce.softmax_cross_entropy_with_integer_labels(logits, labels, reduction="mean")


def sigmoid_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean sigmoid binary cross-entropy over all labels (multi-label: each one independent)."""
    return jaxce.sigmoid_binary_cross_entropy(logits, labels, reduction="mean")


def argmax_prediction(logits: jax.Array) -> jax.Array:
    """Most probable class, ``[..., C] -> [...]`` int32."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def threshold_prediction(logits: jax.Array) -> jax.Array:
    """Each label predicted on when its probability exceeds 1/2, i.e. its logit exceeds 0."""
    return (logits > 0).astype(jnp.float32)


def accuracy(predictions: jax.Array | np.ndarray, labels: jax.Array | np.ndarray) -> float:
    """Fraction of examples whose predictions all match (exact match for multi-label rows)."""
    correct = np.asarray(predictions) == np.asarray(labels)
    return float(np.mean(correct.reshape(len(correct), -1).all(axis=-1)))


# ------------------------------------------------------------------------------------------------
# Models and training loops: one per framework, the same MLP and the same loop.


class MLP(nnx.Module):
    """Flax NNX multi-layer perceptron: ``Linear -> relu -> Linear -> relu -> Linear``."""

    def __init__(self, num_inputs: int, num_hidden: int, num_outputs: int, *, rngs: nnx.Rngs):
        """Creates the layers.

        Args:
          num_inputs: input features (64 for digits).
          num_hidden: width of both hidden layers.
          num_outputs: logits per example.
          rngs: NNX random streams for the initialisers.
        """
        self.hidden1 = nnx.Linear(num_inputs, num_hidden, rngs=rngs)
        self.hidden2 = nnx.Linear(num_hidden, num_hidden, rngs=rngs)
        self.out = nnx.Linear(num_hidden, num_outputs, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps ``[batch, num_inputs]`` inputs to ``[batch, num_outputs]`` logits."""
        x = nnx.relu(self.hidden1(x))
        x = nnx.relu(self.hidden2(x))
        return self.out(x)


class LinenMLP(linen.Module):
    """The same MLP in Flax Linen."""

    num_hidden: int
    num_outputs: int

    @linen.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps ``[batch, features]`` inputs to ``[batch, num_outputs]`` logits."""
        x = linen.relu(linen.Dense(self.num_hidden)(x))
        x = linen.relu(linen.Dense(self.num_hidden)(x))
        return linen.Dense(self.num_outputs)(x)


def haiku_mlp(num_hidden: int, num_outputs: int) -> hk.Transformed:
    """The same MLP in Haiku, as a pure ``(init, apply)`` pair without an apply-time rng."""

    def forward(x: jax.Array) -> jax.Array:
        return hk.nets.MLP([num_hidden, num_hidden, num_outputs])(x)

    return hk.without_apply_rng(hk.transform(forward))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters shared by the three training loops.

    Attributes:
      epochs: passes over the training set.
      batch_size: examples per optimiser step.
      learning_rate: Adam's step size.
      num_hidden: width of the MLP's two hidden layers.
      seed: seeds the initialisation and the shuffling, so runs are reproducible.
    """

    epochs: int = 20
    batch_size: int = 64
    learning_rate: float = 3e-3
    num_hidden: int = 128
    seed: int = 0


def _run_epochs(
    train_step: Callable[[np.ndarray, np.ndarray], jax.Array],
    evaluate: Callable[[], tuple[float, float]],
    x_train: np.ndarray,
    y_train: np.ndarray,
    config: TrainConfig,
    *,
    desc: str,
    progress: bool,
) -> History:
    """The minibatch loop every framework shares: shuffle, step, evaluate, report."""
    history = History()
    rng = np.random.default_rng(config.seed)
    start = time.perf_counter()
    bar = tqdm(range(config.epochs), desc=desc, disable=not progress, leave=True, unit="epoch")
    for _ in bar:
        losses = [
            train_step(x_train[b], y_train[b])
            for b in minibatches(len(y_train), config.batch_size, rng)
        ]
        history.train_loss.append(float(jnp.mean(jnp.stack(losses))))
        test_loss, test_accuracy = evaluate()
        history.test_loss.append(test_loss)
        history.test_accuracy.append(test_accuracy)
        bar.set_postfix(loss=f"{history.train_loss[-1]:.3f}", acc=f"{test_accuracy:.3f}")
    history.seconds = time.perf_counter() - start
    return history


def train_nnx(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    num_outputs: int = NUM_CLASSES,
    loss_fn: LossFn = softmax_loss,
    predict_fn: PredictFn = argmax_prediction,
    config: TrainConfig = TrainConfig(),
    desc: str = "nnx",
    progress: bool = False,
) -> tuple[MLP, History]:
    """Trains a Flax NNX :class:`MLP` with Adam on ``loss_fn``.

    Args:
      x_train: ``[n, features]`` training inputs.
      y_train: training labels, ``[n]`` integers or ``[n, k]`` floats, whatever ``loss_fn`` takes.
      x_test: held-out inputs.
      y_test: held-out labels, same kind as ``y_train``.
      num_outputs: logits per example.
      loss_fn: ``loss_fn(logits, labels) -> scalar``.
      predict_fn: turns logits into predictions comparable with the labels.
      config: hyperparameters and seed.
      desc: label of the progress bar.
      progress: show a tqdm progress bar.

    Returns:
      ``(model, history)``: the trained model and its per-epoch :class:`History`.
    """
    model = MLP(x_train.shape[-1], config.num_hidden, num_outputs, rngs=nnx.Rngs(config.seed))
    optimizer = nnx.Optimizer(model, optax.adam(config.learning_rate), wrt=nnx.Param)

    @nnx.jit
    def step(model: MLP, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> jax.Array:
        loss, grads = nnx.value_and_grad(lambda m: loss_fn(m(x), y))(model)
        optimizer.update(model, grads)
        return loss

    @nnx.jit
    def evaluate(model: MLP, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = model(x)
        return loss_fn(logits, y), predict_fn(logits)

    def evaluate_test() -> tuple[float, float]:
        loss, predictions = evaluate(model, jnp.asarray(x_test), jnp.asarray(y_test))
        return float(loss), accuracy(predictions, y_test)

    history = _run_epochs(
        lambda x, y: step(model, optimizer, jnp.asarray(x), jnp.asarray(y)),
        evaluate_test,
        x_train,
        y_train,
        config,
        desc=desc,
        progress=progress,
    )
    return model, history


def _train_pure(
    init: Callable[[jax.Array, jax.Array], optax.Params],
    apply: Callable[[optax.Params, jax.Array], jax.Array],
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    loss_fn: LossFn,
    predict_fn: PredictFn,
    config: TrainConfig,
    desc: str,
    progress: bool,
) -> tuple[optax.Params, History]:
    """Training loop for frameworks with pure ``init(key, x)`` / ``apply(params, x)`` functions."""
    optimizer = optax.adam(config.learning_rate)
    state = {"params": init(jax.random.key(config.seed), jnp.asarray(x_train[:1]))}
    state["opt_state"] = optimizer.init(state["params"])

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(apply(p, x), y))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def evaluate(params, x, y):
        logits = apply(params, x)
        return loss_fn(logits, y), predict_fn(logits)

    def train_step(x: np.ndarray, y: np.ndarray) -> jax.Array:
        state["params"], state["opt_state"], loss = step(state["params"], state["opt_state"], x, y)
        return loss

    def evaluate_test() -> tuple[float, float]:
        loss, predictions = evaluate(state["params"], x_test, y_test)
        return float(loss), accuracy(predictions, y_test)

    history = _run_epochs(
        train_step, evaluate_test, x_train, y_train, config, desc=desc, progress=progress
    )
    return state["params"], history


def train_linen(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    num_outputs: int = NUM_CLASSES,
    loss_fn: LossFn = softmax_loss,
    predict_fn: PredictFn = argmax_prediction,
    config: TrainConfig = TrainConfig(),
    desc: str = "linen",
    progress: bool = False,
) -> tuple[optax.Params, History]:
    """Trains a Flax Linen :class:`LinenMLP` with Adam on ``loss_fn``.

    Args and the returned history are as for :func:`train_nnx`.

    Returns:
      ``(variables, history)``: the trained Linen variables and the per-epoch :class:`History`.
    """
    model = LinenMLP(num_hidden=config.num_hidden, num_outputs=num_outputs)
    return _train_pure(
        model.init,
        # flax types apply's result as maybe (output, state), which it is only with `mutable`.
        model.apply,  # type: ignore[arg-type]
        x_train,
        y_train,
        x_test,
        y_test,
        loss_fn=loss_fn,
        predict_fn=predict_fn,
        config=config,
        desc=desc,
        progress=progress,
    )


def train_haiku(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    num_outputs: int = NUM_CLASSES,
    loss_fn: LossFn = softmax_loss,
    predict_fn: PredictFn = argmax_prediction,
    config: TrainConfig = TrainConfig(),
    desc: str = "haiku",
    progress: bool = False,
) -> tuple[optax.Params, History]:
    """Trains the Haiku MLP of :func:`haiku_mlp` with Adam on ``loss_fn``.

    Args and the returned history are as for :func:`train_nnx`.

    Returns:
      ``(params, history)``: the trained Haiku parameters and the per-epoch :class:`History`.
    """
    model = haiku_mlp(config.num_hidden, num_outputs)
    return _train_pure(
        model.init,
        model.apply,
        x_train,
        y_train,
        x_test,
        y_test,
        loss_fn=loss_fn,
        predict_fn=predict_fn,
        config=config,
        desc=desc,
        progress=progress,
    )


# ------------------------------------------------------------------------------------------------
# The demo: python -m jaxce


@dataclasses.dataclass
class DemoResult:
    """What :func:`run_demo` measured.

    Attributes:
      multiclass_accuracy: held-out accuracy of the 10-class softmax model.
      multilabel_accuracy: held-out accuracy of each derived label, keyed by :data:`LABEL_NAMES`.
      multilabel_exact_match: fraction of held-out digits with all three labels right.
      binary_sigmoid_accuracy: even-vs-odd accuracy with one logit and sigmoid cross-entropy.
      binary_softmax_accuracy: even-vs-odd accuracy with two logits and softmax cross-entropy.
      histories: the :class:`History` of each run, keyed by a short description.
      seconds: wall-clock time of all runs.
    """

    multiclass_accuracy: float
    multilabel_accuracy: dict[str, float]
    multilabel_exact_match: float
    binary_sigmoid_accuracy: float
    binary_softmax_accuracy: float
    histories: dict[str, History]
    seconds: float


def _binary_sigmoid_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    # One logit per example: [n, 1] -> [n], labels are 0./1. floats.
    return jaxce.sigmoid_binary_cross_entropy(logits[:, 0], labels, reduction="mean")


def _binary_sigmoid_prediction(logits: jax.Array) -> jax.Array:
    return (logits[:, 0] > 0).astype(jnp.float32)


def run_demo(
    *, epochs: int = 20, seed: int = 0, plot: str | None = None, progress: bool = True
) -> DemoResult:
    """Trains four MLPs on digits and prints what they show about softmax and sigmoid.

    1. Multi-class: 10 logits, softmax cross-entropy -- exactly one digit per image.
    2. Multi-label: 3 logits, sigmoid cross-entropy on :func:`derived_labels` -- any subset of
       {even, greater than 4, prime} can hold at once.
    3. Two classes (even vs odd) done both ways: 1 logit with sigmoid cross-entropy, and 2 logits
       with softmax cross-entropy. They model the same thing, because
       ``sigmoid(x) = softmax([0, x])[1]``: only the difference of the two logits matters.

    Args:
      epochs: passes over the training data for each model.
      seed: seeds the split, the initialisation and the shuffling.
      plot: if given, a path where a PNG of the loss curves is written.
      progress: show tqdm progress bars (on stderr).

    Returns:
      A :class:`DemoResult` with the accuracies printed.
    """
    start = time.perf_counter()
    data = load_digits_split(seed=seed)
    config = TrainConfig(epochs=epochs, seed=seed)
    print(
        f"jaxce demo: MLP 64-{config.num_hidden}-{config.num_hidden}-k on scikit-learn digits "
        f"({len(data.y_train)} train / {len(data.y_test)} held-out images), "
        f"{epochs} epochs, seed {seed}",
        flush=True,  # before the progress bars, which go to stderr
    )
    model, multiclass = train_nnx(
        data.x_train,
        data.y_train,
        data.x_test,
        data.y_test,
        desc="softmax, 10 classes",
        config=config,
        progress=progress,
    )

    labels_train, labels_test = derived_labels(data.y_train), derived_labels(data.y_test)
    model, multilabel = train_nnx(
        data.x_train,
        labels_train,
        data.x_test,
        labels_test,
        num_outputs=len(LABEL_NAMES),
        loss_fn=sigmoid_loss,
        predict_fn=threshold_prediction,
        desc="sigmoid, 3 labels",
        config=config,
        progress=progress,
    )
    label_predictions = np.asarray(threshold_prediction(model(jnp.asarray(data.x_test))))
    per_label = {
        name: float(np.mean(label_predictions[:, i] == labels_test[:, i]))
        for i, name in enumerate(LABEL_NAMES)
    }

    even_train, even_test = labels_train[:, 0], labels_test[:, 0]
    _, binary_sigmoid = train_nnx(
        data.x_train,
        even_train,
        data.x_test,
        even_test,
        num_outputs=1,
        loss_fn=_binary_sigmoid_loss,
        predict_fn=_binary_sigmoid_prediction,
        desc="even/odd, 1 logit",
        config=config,
        progress=progress,
    )
    _, binary_softmax = train_nnx(
        data.x_train,
        even_train.astype(np.int32),
        data.x_test,
        even_test.astype(np.int32),
        num_outputs=2,
        desc="even/odd, 2 logits",
        config=config,
        progress=progress,
    )

    histories = {
        "10 classes, softmax CE": multiclass,
        "3 labels, sigmoid BCE": multilabel,
        "even/odd, 1 logit + sigmoid BCE": binary_sigmoid,
        "even/odd, 2 logits + softmax CE": binary_softmax,
    }
    result = DemoResult(
        multiclass_accuracy=multiclass.test_accuracy[-1],
        multilabel_accuracy=per_label,
        multilabel_exact_match=multilabel.test_accuracy[-1],
        binary_sigmoid_accuracy=binary_sigmoid.test_accuracy[-1],
        binary_softmax_accuracy=binary_softmax.test_accuracy[-1],
        histories=histories,
        seconds=time.perf_counter() - start,
    )
    _print_result(result)
    if plot is not None:
        plot_histories(histories).savefig(plot, dpi=100)
        print(f"Loss curves written to {plot}")
    return result


def _print_result(result: DemoResult) -> None:
    labels = ", ".join(f"{name} {acc:.1%}" for name, acc in result.multilabel_accuracy.items())
    print()
    print("Multi-class, one answer per image (10 logits, softmax cross-entropy)")
    print(f"  held-out accuracy {result.multiclass_accuracy:.1%}")
    print("Multi-label, any subset of answers (3 logits, one sigmoid cross-entropy each)")
    print(f"  per label: {labels}")
    print(f"  exact match (all three right): {result.multilabel_exact_match:.1%}")
    print(
        "Two classes, even vs odd -- the same model family, since sigmoid(x) = softmax([0, x])[1]"
    )
    print(f"  1 logit,  sigmoid cross-entropy: {result.binary_sigmoid_accuracy:.1%}")
    print(f"  2 logits, softmax cross-entropy: {result.binary_softmax_accuracy:.1%}")
    print(f"({result.seconds:.1f} s)")


def plot_histories(
    histories: dict[str, History], *, figsize: tuple[float, float] = (9.0, 3.4)
):  # -> matplotlib.figure.Figure; matplotlib is imported lazily
    """Draws training (solid) and held-out (dashed) loss, and held-out accuracy, per epoch.

    Uses matplotlib's object-oriented API without pyplot, so it needs no display and leaves no
    global state; a notebook shows the returned figure when it is a cell's value.

    Args:
      histories: :class:`History` per run, keyed by the legend label.
      figsize: width and height in inches.

    Returns:
      A ``matplotlib.figure.Figure`` with two panels.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=figsize, layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for i, (name, history) in enumerate(histories.items()):
        epochs = np.arange(1, len(history.train_loss) + 1)
        color = f"C{i}"
        loss_ax.plot(epochs, history.train_loss, color=color, label=name)
        loss_ax.plot(epochs, history.test_loss, color=color, linestyle="--")
        acc_ax.plot(epochs, history.test_accuracy, color=color, label=name)
    loss_ax.set(
        xlabel="epoch", ylabel="loss", yscale="log", title="loss (solid train, dashed held-out)"
    )
    acc_ax.set(xlabel="epoch", ylabel="held-out accuracy", title="held-out accuracy")
    acc_ax.legend(fontsize="small")
    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig
