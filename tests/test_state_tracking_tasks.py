"""The state-tracking and recall tasks: group_word, modular_sum, mqar.

Targets are checked against independent computations in plain Python (permutations composed as lists, sums,
dict look-ups), the group tables against the group axioms, and the splits against their documented shapes.
"""

import itertools

import numpy as np
import pytest

from rnnjax import tasks
from rnnjax.tasks.state_tracking import GROUPS, multiplication_table, permutations

ORDERS = {"S3": 6, "Z5": 5, "A5": 60, "S5": 120}


def compose(a, b):
    """``a`` first, then ``b``, as plain lists: x -> b[a[x]]."""
    return [b[a[x]] for x in range(len(a))]


def sign(p):
    return (-1) ** sum(1 for i, j in itertools.combinations(range(len(p)), 2) if p[i] > p[j])


def small(name, **options):
    return tasks.get(name, eval_size=24, **options)


# The groups.


@pytest.mark.parametrize("group", GROUPS)
def test_table_is_a_group(group):
    perms = permutations(group)
    table = multiplication_table(perms)
    G = len(perms)
    assert G == ORDERS[group] and table.shape == (G, G)
    assert len({tuple(p) for p in perms}) == G  # distinct elements
    assert list(perms[0]) == sorted(perms[0])  # id 0 is the identity
    np.testing.assert_array_equal(table[0], np.arange(G))
    np.testing.assert_array_equal(table[:, 0], np.arange(G))
    for row in table:  # a Latin square: every product once per row and column (cancellation)
        assert sorted(row) == list(range(G))
    for column in table.T:
        assert sorted(column) == list(range(G))
    assert all((table[a] == 0).sum() == 1 for a in range(G))  # every element has an inverse
    a, b, c = np.meshgrid(np.arange(G), np.arange(G), np.arange(G), indexing="ij")
    np.testing.assert_array_equal(table[table[a, b], c], table[a, table[b, c]])  # associativity


@pytest.mark.parametrize("group", GROUPS)
def test_table_composes_left_to_right(group):
    perms = [list(p) for p in permutations(group)]
    table = multiplication_table(np.array(perms))
    rng = np.random.default_rng(0)
    for a, b in rng.integers(0, len(perms), size=(50, 2)):
        assert perms[table[a, b]] == compose(perms[a], perms[b])


def test_a5_is_the_even_permutations_and_s3_not_abelian():
    evens = {p for p in itertools.permutations(range(5)) if sign(p) == 1}
    assert {tuple(p) for p in permutations("A5")} == evens and len(evens) == 60
    s3 = multiplication_table(permutations("S3"))
    assert not np.array_equal(s3, s3.T)  # left-to-right matters
    z5 = multiplication_table(permutations("Z5"))
    np.testing.assert_array_equal(z5, (np.arange(5)[:, None] + np.arange(5)[None, :]) % 5)


def test_not_a_group_is_refused():
    with pytest.raises(ValueError, match="closed"):
        multiplication_table(np.array([[0, 1, 2], [1, 2, 0]]))
    with pytest.raises(ValueError, match="group"):
        tasks.get("group_word", group="S4")


# group_word.


@pytest.mark.parametrize("group", GROUPS)
def test_group_word_targets_are_running_products(group):
    task = small("group_word", group=group, train_len=7, long_len=15)
    perms = [list(p) for p in permutations(group)]
    identity = list(range(len(perms[0])))
    for batch in (task.train_batch(3, 5), task.eval_batch("test_long")):
        for word, targets in zip(batch.inputs, batch.targets):
            state = identity
            for g, target in zip(word, targets):
                state = compose(state, perms[g])
                assert perms[target] == state


def test_group_word_shapes_and_splits():
    task = small("group_word", group="A5", train_len=8, long_len=20)
    assert task.vocab_size == task.output_size == 60 and task.kind == "per_step_classify"
    for split in ("valid", "test"):
        batch = task.eval_batch(split)
        assert batch.inputs.shape == batch.targets.shape == (24, 8) and batch.inputs.dtype == np.int32
        assert batch.mask is None and batch.lengths is None
    long = task.eval_batch("test_long")
    assert long.inputs.shape == (24, 20) and long.inputs.shape[1] > task.train_batch(0, 2).inputs.shape[1]
    np.testing.assert_array_equal(long.mask, np.broadcast_to(np.arange(20) >= 8, (24, 20)))
    assert not np.array_equal(task.eval_batch("valid").inputs, task.eval_batch("test").inputs)
    with pytest.raises(ValueError, match="splits"):
        task.eval_batch("train")
    with pytest.raises(ValueError, match="train_len"):
        tasks.get("group_word", train_len=10, long_len=10)


@pytest.mark.parametrize(
    "name, options",
    [
        ("group_word", dict(group="S5", train_len=6, long_len=9)),
        ("modular_sum", dict(modulus=5, train_len=6, long_len=9)),
        ("mqar", dict(vocab_size=32, num_pairs=2, seq_len=12, long_pairs=4, long_len=20)),
    ],
)
def test_deterministic_per_seed(name, options):
    a, b, c = small(name, **options), small(name, **options), small(name, seed=1, **options)
    for x, y in ((a.train_batch(5, 4), b.train_batch(5, 4)), (a.eval_batch("test_long"), b.eval_batch("test_long"))):
        for field_x, field_y in zip(x, y):
            if field_x is not None:
                np.testing.assert_array_equal(field_x, field_y)
    assert not np.array_equal(a.train_batch(5, 4).inputs, c.train_batch(5, 4).inputs)
    assert not np.array_equal(a.train_batch(5, 4).inputs, a.train_batch(6, 4).inputs)
    assert tasks.get(name, **a.options()) == a


def test_length_sweep_scores_the_last_step():
    task = small("group_word", group="S3", train_len=4, long_len=12)
    batch = task.length_sweep([1, 5, 12], per_length=3)
    assert batch.inputs.shape == (9, 12)
    np.testing.assert_array_equal(batch.lengths, [1, 1, 1, 5, 5, 5, 12, 12, 12])
    np.testing.assert_array_equal(batch.mask.sum(axis=1), np.ones(9))
    np.testing.assert_array_equal(np.argmax(batch.mask, axis=1), batch.lengths - 1)
    np.testing.assert_array_equal(batch.targets, task.running_state(batch.inputs))


@pytest.mark.parametrize("group", GROUPS)
def test_group_word_baseline_is_near_chance(group):
    task = tasks.get("group_word", group=group, train_len=16, long_len=32, eval_size=400)
    for split in task.splits:
        assert 0.5 / ORDERS[group] < task.baseline_score(split) < 2.5 / ORDERS[group]


# modular_sum.


@pytest.mark.parametrize("modulus, symbols", [(2, None), (3, None), (5, None), (3, 10)])
def test_modular_sum_targets(modulus, symbols):
    task = small("modular_sum", modulus=modulus, symbols=symbols, train_len=9, long_len=17)
    assert task.output_size == modulus and task.vocab_size == (symbols or modulus)
    for batch in (task.train_batch(0, 6), task.eval_batch("test_long")):
        assert batch.inputs.max() < task.vocab_size
        for row, targets in zip(batch.inputs.tolist(), batch.targets.tolist()):
            assert targets == [sum(row[: t + 1]) % modulus for t in range(len(row))]
    assert task.eval_batch("test_long").inputs.shape == (24, 17)
    baseline = tasks.get("modular_sum", modulus=modulus, eval_size=500).baseline_score("test")
    assert abs(baseline - 1 / modulus) < 0.1


def test_modular_sum_rejects_bad_options():
    with pytest.raises(ValueError, match="modulus"):
        tasks.get("modular_sum", modulus=1)
    with pytest.raises(ValueError, match="symbols"):
        tasks.get("modular_sum", symbols=1)


# mqar.


def recall_by_lookup(inputs, num_pairs):
    """A row's key -> value bindings, as a dict (looked up at each query)."""
    return {inputs[2 * i]: inputs[2 * i + 1] for i in range(num_pairs)}


def test_mqar_layout_and_targets():
    task = small("mqar", vocab_size=40, num_pairs=5, seq_len=30, long_pairs=8, long_len=40)
    for batch, D, T in ((task.train_batch(2, 16), 5, 30), (task.eval_batch("test_long"), 8, 40)):
        assert batch.inputs.shape == batch.targets.shape == batch.mask.shape == (len(batch.inputs), T)
        for inputs, targets, mask in zip(batch.inputs.tolist(), batch.targets.tolist(), batch.mask.tolist()):
            keys, values = inputs[0 : 2 * D : 2], inputs[1 : 2 * D : 2]
            assert all(1 <= k < 20 for k in keys) and all(20 <= v < 40 for v in values)  # disjoint halves
            assert len(set(keys)) == len(set(values)) == D
            bound = recall_by_lookup(inputs, D)
            queries = [t for t in range(T) if mask[t] == 1.0]
            assert len(queries) == D and all(t >= 2 * D and (t - 2 * D) % 2 == 0 for t in queries)
            assert sorted(inputs[t] for t in queries) == sorted(keys)  # every key queried once
            assert all(inputs[t] not in keys for t in range(2 * D, T) if t not in queries)  # fillers: no keys
            for t in queries:
                assert targets[t] == bound[inputs[t]]
            assert all(targets[t] == 0 for t in range(T) if mask[t] == 0.0)


def test_mqar_fill_and_power_law():
    plain = small("mqar", random_fill=False, num_pairs=4, seq_len=64, long_pairs=8, long_len=128)
    batch = plain.train_batch(0, 8)
    query_region = batch.inputs[:, 8:] * (batch.mask[:, 8:] == 0)
    assert query_region.sum() == 0  # fillers are token 0 without random_fill
    # Zoology's power law puts queries early in the query region; uniform offsets spread them out.
    early = tasks.get("mqar", num_pairs=4, seq_len=64, eval_size=400).eval_batch("test")
    flat = tasks.get("mqar", num_pairs=4, seq_len=64, power_a=1.0, eval_size=400).eval_batch("test")
    mean_position = lambda b: float((b.mask * np.arange(64)).sum() / b.mask.sum())  # noqa: E731
    assert mean_position(early) < mean_position(flat) - 5


def test_mqar_length_sweep_and_baseline():
    task = small("mqar", vocab_size=64, num_pairs=4, seq_len=32, long_pairs=8, long_len=64)
    batch = task.length_sweep([8, 32, 64], per_length=2)
    assert batch.inputs.shape == (6, 64)
    np.testing.assert_array_equal(batch.lengths, [8, 8, 32, 32, 64, 64])
    np.testing.assert_array_equal(batch.mask.sum(axis=1), [1, 1, 4, 4, 8, 8])  # the training density of pairs
    assert batch.mask[:2, 8:].sum() == 0
    baseline = tasks.get("mqar", eval_size=300).baseline_score("test")
    assert 0.0 < baseline < 0.1


def test_mqar_rejects_bad_options():
    with pytest.raises(ValueError, match="room"):
        tasks.get("mqar", num_pairs=20, long_pairs=20, seq_len=64)
    with pytest.raises(ValueError, match="distinct keys"):
        tasks.get("mqar", vocab_size=16, num_pairs=4, long_pairs=8, seq_len=32, long_len=64)
    with pytest.raises(ValueError, match="long_len"):
        tasks.get("mqar", seq_len=64, long_len=64, long_pairs=8)


def test_registered_and_buildable():
    from rnnjax.models import build_model

    assert {"group_word", "modular_sum", "mqar"} <= set(tasks.names())
    for name in ("group_word", "modular_sum", "mqar"):
        task = small(name)
        model = build_model(task, "gru", hidden_size=8)
        assert model.vocab_size == task.vocab_size and model.head == "per_step"
