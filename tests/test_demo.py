"""The digits demo behind ``python -m jaxce``: data helpers, the full run and the command line."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("haiku")
pytest.importorskip("sklearn")

from jaxce import demo  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def standard_promotion():
    """Standard dtype promotion: optax's Adam computes ``decay ** count`` (float ** int32)."""
    with jax.numpy_dtype_promotion("standard"):
        yield


def test_load_digits_split_is_stratified_and_seeded() -> None:
    data = demo.load_digits_split(seed=0)
    assert data.x_train.shape == (1347, 64) and data.x_test.shape == (450, 64)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int32
    assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0
    # stratified: each digit's share of the held-out set is its share of the data (+-1 image)
    counts = np.bincount(np.concatenate([data.y_train, data.y_test]), minlength=10)
    np.testing.assert_allclose(np.bincount(data.y_test, minlength=10), counts * 0.25, atol=1)
    again = demo.load_digits_split(seed=0)
    np.testing.assert_array_equal(data.y_test, again.y_test)
    other = demo.load_digits_split(seed=1)
    assert not np.array_equal(data.y_test, other.y_test)


def test_derived_labels() -> None:
    labels = demo.derived_labels(np.arange(10))
    expected = np.array(
        #  even  >4  prime
        [
            [1, 0, 0],  # 0
            [0, 0, 0],  # 1
            [1, 0, 1],  # 2
            [0, 0, 1],  # 3
            [1, 0, 0],  # 4
            [0, 1, 1],  # 5
            [1, 1, 0],  # 6
            [0, 1, 1],  # 7
            [1, 1, 0],  # 8
            [0, 1, 0],  # 9
        ],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(labels, expected)
    assert labels.dtype == np.float32


def test_imbalanced_subset_thins_only_the_rare_classes() -> None:
    y = np.repeat(np.arange(10), 100)
    x = np.arange(len(y))
    x_sub, y_sub = demo.imbalanced_subset(x, y, rare_classes=(0, 1), keep_fraction=0.1, seed=0)
    counts = np.bincount(y_sub, minlength=10)
    np.testing.assert_array_equal(counts, [10, 10] + [100] * 8)
    np.testing.assert_array_equal(y[x_sub], y_sub)  # inputs stay paired with their labels


def test_minibatches_have_equal_size_and_do_not_repeat() -> None:
    batches = list(demo.minibatches(10, 4, np.random.default_rng(0)))
    assert [len(b) for b in batches] == [4, 4]
    assert len(np.unique(np.concatenate(batches))) == 8
    assert [len(b) for b in demo.minibatches(3, 64, np.random.default_rng(0))] == [3]


def test_training_is_deterministic_given_the_seed() -> None:
    data = demo.load_digits_split(seed=0)
    config = demo.TrainConfig(epochs=1, seed=3)
    _, first = demo.train_nnx(data.x_train, data.y_train, data.x_test, data.y_test, config=config)
    _, second = demo.train_nnx(data.x_train, data.y_train, data.x_test, data.y_test, config=config)
    assert first.train_loss == second.train_loss
    assert first.test_accuracy == second.test_accuracy


def test_run_demo_reaches_the_promised_accuracy(tmp_path: pathlib.Path, capsys) -> None:
    """With default settings the demo reaches >= 95% held-out accuracy, as the README says."""
    plot = tmp_path / "loss.png"
    result = demo.run_demo(plot=str(plot), progress=False)
    assert result.multiclass_accuracy >= 0.95
    assert result.multilabel_exact_match >= 0.9
    assert min(result.multilabel_accuracy.values()) >= 0.93
    assert min(result.binary_sigmoid_accuracy, result.binary_softmax_accuracy) >= 0.95
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert f"held-out accuracy {result.multiclass_accuracy:.1%}" in out
    assert "exact match" in out and "sigmoid(x) = softmax([0, x])[1]" in out


def test_command_line_runs_one_epoch() -> None:
    """``python -m jaxce --epochs 1`` runs in a fresh interpreter and prints its report."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    completed = subprocess.run(
        [sys.executable, "-m", "jaxce", "--epochs", "1", "--seed", "1"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert "1 epochs, seed 1" in completed.stdout
    assert "held-out accuracy" in completed.stdout
    assert "softmax, 10 classes" in completed.stderr  # the progress bar


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epochs", "0"], "argument --epochs: expected an integer >= 1, got 0"),
        (["--epochs", "two"], "argument --epochs: expected an integer >= 1, got 'two'"),
        (["--seed", "-1"], "argument --seed: expected an integer from 0 to 4294967295, got -1"),
        (["--seed", str(2**32)], "argument --seed: expected an integer from 0 to 4294967295"),
        (["--plot", "{tmp}/missing/dir/x.png"], "missing/dir' of '"),
        (["--plot", "{tmp}/loss.txt"], "must end in a suffix matplotlib can write (avif, eps,"),
        (["--plot", "{tmp}/loss"], "must end in a suffix matplotlib can write"),
        (["--plot", "{tmp}/folder.png"], "is a folder, not a file"),
    ],
)
def test_command_line_rejects_bad_arguments_before_training(
    args: list[str], message: str, tmp_path: pathlib.Path, capsys, monkeypatch
) -> None:
    """Bad arguments exit with status 2 and a message naming the argument, before any training."""
    from jaxce.__main__ import main

    (tmp_path / "folder.png").mkdir()
    trained = []
    monkeypatch.setattr(demo, "run_demo", lambda **kwargs: trained.append(kwargs))
    with pytest.raises(SystemExit) as excinfo:
        main([arg.format(tmp=tmp_path) for arg in args])
    assert excinfo.value.code == 2
    assert message in capsys.readouterr().err
    assert not trained
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.png"]  # nothing written


def test_command_line_rejects_a_plot_it_cannot_write(tmp_path: pathlib.Path, capsys) -> None:
    from jaxce.__main__ import main

    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where the plot's folder should be
    with pytest.raises(SystemExit) as excinfo:
        main(["--plot", str(blocker / "x.png")])
    assert excinfo.value.code == 2
    assert "argument --plot:" in capsys.readouterr().err


def test_command_line_accepts_good_arguments(tmp_path: pathlib.Path, monkeypatch) -> None:
    """Valid arguments reach the demo unchanged, and the plot file is not created early."""
    from jaxce.__main__ import main

    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda **kwargs: calls.append(kwargs))
    plot = tmp_path / "curves.PDF"
    assert main(["--epochs", "3", "--seed", "7", "--plot", str(plot), "--no-progress"]) == 0
    assert calls == [dict(epochs=3, seed=7, plot=str(plot), progress=False)]
    assert not plot.exists()
