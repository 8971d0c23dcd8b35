"""Generation: sampling from language models (rnnjax.generate), beam search for seq2seq, the CLI, CharLM.encode.

References are independent of the code under test: generation is compared with a plain loop that re-applies
the whole model to the growing sequence (no streaming state), filtering with a NumPy implementation, and beam
search with brute-force enumeration of every output sequence and with a Python beam search that scores
prefixes by teacher forcing.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax
from rnnjax import generation, models, tasks
from rnnjax.__main__ import main as cli_main
from rnnjax.attention import Transformer
from rnnjax.seq2seq import EncoderDecoder, PrefixLM

V = 13  # vocabulary of the toy language models


class ToyLM:
    """A stand-in task for build_model: token inputs, next-token outputs."""

    kind = "per_step_classify"
    vocab_size = V
    output_size = V


def lstm_lm():
    return models.build_model(ToyLM(), "lstm", hidden_size=16)


def stacked_gru_lm():
    return models.build_model(ToyLM(), "gru", hidden_size=12, num_layers=2, residual=True)


def transformer_lm():
    return Transformer(vocab_size=V, output_size=V, d_model=16, num_heads=2, num_layers=2, head="per_step")


LANGUAGE_MODELS = {"lstm": lstm_lm, "stacked_gru": stacked_gru_lm, "transformer": transformer_lm}
PROMPTS = [[3, 1, 4, 1, 5], [9, 2], [6, 5, 3]]  # different lengths: padded into one batch


@functools.cache
def language_model(name):
    model = LANGUAGE_MODELS[name]()
    params = model.init(jax.random.key(0))
    # Larger logits than at initialisation, so that sampling differs visibly from uniform.
    params["head"] = jax.tree.map(lambda a: 3.0 * a, params["head"])
    return model, params


@functools.partial(jax.jit, static_argnums=0)
def apply(model, params, ids):
    return model.apply(params, ids)


# The NumPy reference of top-k and top-p filtering.


def reference_filter(logits, top_k=None, top_p=None):
    """Row by row: drop logits below the k-th largest; then keep tokens by probability until the mass reaches p."""
    out = np.array(logits, np.float64)
    for row in out.reshape(-1, out.shape[-1]):
        if top_k is not None:
            kth = np.sort(row)[::-1][min(top_k, row.size) - 1]
            row[row < kth] = -np.inf
        if top_p is not None:
            probs = np.exp(row - row.max())
            probs /= probs.sum()
            mass, last = 0.0, None
            for index in np.argsort(-probs, kind="stable"):
                last = index
                mass += probs[index]
                if mass >= top_p:
                    break
            row[probs < probs[last]] = -np.inf
    return out


def reference_sample(key, logits_rows, temperature, top_k, top_p):
    """One token per row, drawn as generation documents it: categorical over the NumPy-filtered logits."""
    logits = np.asarray(logits_rows, np.float64)  # (B, V)
    if temperature == 0:
        return logits.argmax(-1)
    filtered = reference_filter(logits / temperature, top_k, top_p)
    return np.asarray(jax.random.categorical(key, jnp.asarray(filtered, jnp.float32), axis=-1))


def reference_generate(model, params, prompts, max_new_tokens, temperature=0.0, top_k=None, top_p=None, key=None):
    """Re-applies the whole model to every row's growing sequence; no carry, no cache.

    Rows sit in one zero-padded array of a fixed length (one compilation); both model families are causal, so
    the logits at a row's last token do not depend on the padding after it.
    """
    keys = jax.random.split(key, max_new_tokens) if key is not None else [None] * max_new_tokens
    lengths = np.array([len(p) for p in prompts])
    ids = np.zeros((len(prompts), lengths.max() + max_new_tokens), np.int32)
    for row, prompt in zip(ids, prompts):
        row[: len(prompt)] = prompt
    for step_key in keys:
        logits = np.asarray(apply(model, params, jnp.asarray(ids)))[np.arange(len(ids)), lengths - 1]  # (B, V)
        ids[np.arange(len(ids)), lengths] = reference_sample(step_key, logits, temperature, top_k, top_p)
        lengths = lengths + 1
    return np.array([row[len(p) : len(p) + max_new_tokens] for row, p in zip(ids, prompts)])


# Filtering and sampling one step.


@pytest.mark.parametrize("top_k", [None, 1, 3, V, V + 4])
@pytest.mark.parametrize("top_p", [None, 0.3, 0.9, 1.0])
def test_filter_logits_matches_numpy(top_k, top_p):
    logits = np.round(2 * np.random.default_rng(0).normal(size=(6, V)) * 1.5) / 2  # halves: many ties
    got = np.asarray(generation.filter_logits(jnp.asarray(logits, jnp.float32), top_k=top_k, top_p=top_p))
    want = reference_filter(logits, top_k, top_p)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-6)


def test_filter_logits_keeps_ties_and_the_most_probable_token():
    logits = jnp.array([[2.0, 1.0, 1.0, 0.0]])
    assert np.isfinite(generation.filter_logits(logits, top_k=2)).tolist() == [[True, True, True, False]]
    assert np.isfinite(generation.filter_logits(logits, top_p=1e-6)).tolist() == [[True, False, False, False]]


def test_sample_logits_follows_the_filtered_tempered_distribution():
    logits = jnp.array([2.0, 1.5, 0.5, 0.0, -1.0])
    temperature, top_p = 0.7, 0.8  # top-p on the tempered distribution: keeps the first two tokens only
    keys = jax.random.split(jax.random.key(0), 20_000)
    draws = jax.vmap(lambda k: generation.sample_logits(k, logits, temperature=temperature, top_p=top_p))(keys)
    filtered = reference_filter(np.asarray(logits) / temperature, top_p=top_p)
    want = np.exp(filtered - filtered.max())
    want /= want.sum()
    got = np.bincount(np.asarray(draws), minlength=5) / draws.size
    np.testing.assert_allclose(got, want, atol=0.02)  # 6 standard deviations at this count
    assert got[2:].sum() == 0


def test_temperature_zero_is_the_argmax():
    logits = jax.random.normal(jax.random.key(1), (7, V))
    want = np.asarray(logits).argmax(-1)
    np.testing.assert_array_equal(generation.sample_logits(None, logits, temperature=0), want)
    traced = jax.jit(generation.sample_logits)(jax.random.key(0), logits, temperature=0.0, top_k=3)
    np.testing.assert_array_equal(traced, want)


# Language models.


@pytest.mark.parametrize("name", list(LANGUAGE_MODELS))
def test_greedy_generation_equals_reapplying_the_model(name):
    model, params = language_model(name)
    got = rnnjax.generate(model, params, PROMPTS, max_new_tokens=6, temperature=0)
    np.testing.assert_array_equal(got, reference_generate(model, params, PROMPTS, 6))


@pytest.mark.parametrize("name", list(LANGUAGE_MODELS))
def test_sampling_equals_reapplying_the_model_with_the_documented_keys(name):
    model, params = language_model(name)
    key = jax.random.key(7)
    options = dict(temperature=0.9, top_k=8, top_p=0.95)
    got = rnnjax.generate(model, params, PROMPTS, max_new_tokens=6, key=key, **options)
    np.testing.assert_array_equal(got, reference_generate(model, params, PROMPTS, 6, key=key, **options))


def test_a_padded_batch_equals_the_list_form_and_one_prompt_alone():
    model, params = language_model("transformer")
    padded = np.array([[3, 1, 4, 1, 5], [9, 2, 0, 0, 0], [6, 5, 3, 0, 0]], np.int32)
    lengths = np.array([5, 2, 3])
    batch = rnnjax.generate(model, params, padded, lengths=lengths, max_new_tokens=6, temperature=0)
    np.testing.assert_array_equal(batch, rnnjax.generate(model, params, PROMPTS, max_new_tokens=6, temperature=0))
    alone = rnnjax.generate(model, params, np.array(PROMPTS[1]), max_new_tokens=6, temperature=0)
    assert alone.shape == (6,)
    np.testing.assert_array_equal(alone, batch[1])


def test_generation_is_a_function_of_the_key():
    model, params = language_model("lstm")
    run = functools.partial(rnnjax.generate, model, params, PROMPTS, max_new_tokens=12, top_p=0.9)
    first, again = run(key=jax.random.key(3)), run(key=jax.random.key(3))
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(run(key=3), first)  # an integer seed is jax.random.key(seed)
    assert not np.array_equal(run(key=jax.random.key(4)), first)


def test_one_compilation_serves_every_temperature_and_filter():
    if not hasattr(generation._generate, "_cache_size"):
        pytest.skip("this jax does not report the size of a jitted function's cache")
    model, params = language_model("stacked_gru")
    prompt = np.array([[1, 2, 3]])
    rnnjax.generate(model, params, prompt, max_new_tokens=4, key=0)
    before = generation._generate._cache_size()
    for options in (dict(temperature=0.0), dict(temperature=2.0, top_k=2), dict(temperature=0.5, top_p=0.5)):
        rnnjax.generate(model, params, prompt, max_new_tokens=4, key=1, **options)
    assert generation._generate._cache_size() == before


def test_zero_new_tokens():
    model, params = language_model("lstm")
    assert rnnjax.generate(model, params, PROMPTS, max_new_tokens=0, key=0).shape == (3, 0)


def test_sequence_model_step_streams_apply():
    model, params = language_model("stacked_gru")
    ids = jax.random.randint(jax.random.key(2), (2, 7), 0, V)
    carry, outputs = model.initial_carry(2), []
    for t in range(ids.shape[1]):
        carry, y = model.step(params, carry, ids[:, t])
        outputs.append(y)
    np.testing.assert_allclose(jnp.stack(outputs, 1), model.apply(params, ids), atol=1e-5)


@pytest.mark.parametrize(
    "options, error, match",
    [
        (dict(temperature=-0.5), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(top_k=0), ValueError, "top_k"),
        (dict(top_k=2.5), ValueError, "top_k"),
        (dict(top_p=0.0), ValueError, "top_p"),
        (dict(top_p=1.5), ValueError, "top_p"),
        (dict(max_new_tokens=-1), ValueError, "max_new_tokens"),
        (dict(prompt=[]), ValueError, "prompt"),
        (dict(prompt=np.zeros((2, 0), np.int32)), ValueError, "prompt is empty"),
        (dict(prompt=[[1, 2], []]), ValueError, "lengths must lie in"),
        (dict(prompt=[1, V]), ValueError, r"prompt must be token ids in \[0, 13\)"),
        (dict(prompt=[-1, 2]), ValueError, "prompt must be token ids"),
        (dict(prompt=[0.5, 1.0]), TypeError, "integer token ids"),
        (dict(prompt=np.ones((2, 3), np.int32), lengths=[3, 0]), ValueError, "lengths"),
        (dict(prompt=np.ones((2, 3), np.int32), lengths=[3]), ValueError, "lengths"),
        (dict(key=None), TypeError, "key"),
    ],
)
def test_bad_arguments_are_named(options, error, match):
    model, params = language_model("lstm")
    arguments = dict(prompt=[1, 2], max_new_tokens=3, key=jax.random.key(0)) | options
    with pytest.raises(error, match=match):
        rnnjax.generate(model, params, arguments.pop("prompt"), **arguments)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: models.build_model(ToyLM(), "lstm", hidden_size=4, bidirectional=True), "cannot stream"),
        (lambda: Transformer(input_size=3, output_size=3, d_model=8, num_heads=2), "token inputs"),
        (lambda: Transformer(vocab_size=V, output_size=2, d_model=8, num_heads=2), "next token"),
        (lambda: EncoderDecoder.build("gru", 4, source_vocab=V, target_vocab=V, bos_id=1), "beam_search"),
    ],
)
def test_models_that_cannot_generate_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        rnnjax.generate(make(), None, [1, 2], max_new_tokens=2, temperature=0)  # refused before params are read


# Sequence-to-sequence: beam search.

V_IN, BOS = 9, 1


def seq2seq_model(name, target_vocab):
    if name == "transformer":
        return PrefixLM.build(source_vocab=V_IN, target_vocab=target_vocab, bos_id=BOS, d_model=16, num_heads=2)
    return EncoderDecoder.build(name, 12, source_vocab=V_IN, target_vocab=target_vocab, bos_id=BOS)


@functools.cache
def seq2seq(name, target_vocab):
    model = seq2seq_model(name, target_vocab)
    params = model.init(jax.random.key(1))
    params = jax.tree.map(lambda a: 3.0 * a, params)  # peakier distributions than at initialisation
    return model, params


SOURCE = np.array([[3, 4, 5, 6, 7], [8, 2, 0, 0, 0], [5, 5, 3, 0, 0]], np.int32)
SOURCE_LENGTHS = np.array([5, 2, 3], np.int32)


@functools.partial(jax.jit, static_argnums=0)
def teacher_forced_logits(model, params, source, lengths, targets):
    return model.apply(params, source, lengths=lengths, targets=targets)


def teacher_forced_log_probs(model, params, source_row, length, sequences):
    """``(S, N)`` log-probabilities of each target token of ``sequences`` ``(S, N)`` under teacher forcing."""
    S = len(sequences)
    source = jnp.asarray(np.repeat(source_row[None], S, axis=0))
    logits = teacher_forced_logits(model, params, source, jnp.full((S,), length), jnp.asarray(sequences))
    log_p = np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)  # (S, N, V)
    return np.take_along_axis(log_p, np.asarray(sequences)[..., None], axis=-1)[..., 0]


@pytest.mark.parametrize("name", ["gru", "lstm", "transformer"])
def test_beam_size_one_is_greedy_decoding(name):
    model, params = seq2seq(name, 7)
    result = rnnjax.beam_search(model, params, SOURCE, lengths=SOURCE_LENGTHS, num_steps=6, beam_size=1)
    greedy = jax.jit(model.greedy_decode, static_argnames="num_steps")(
        params, SOURCE, lengths=SOURCE_LENGTHS, num_steps=6
    )
    np.testing.assert_array_equal(result.tokens[:, 0], greedy)


@pytest.mark.parametrize("name", ["gru", pytest.param("transformer", marks=pytest.mark.slow)])
def test_beam_search_finds_the_most_probable_sequences_by_enumeration(name):
    """With K = V^(N-1) beams the search keeps every prefix, so its beams are the K best of all V^N outputs."""
    T_V, N = 3, 3
    model, params = seq2seq(name, T_V)
    everything = np.array(list(itertools.product(range(T_V), repeat=N)), np.int32)  # (27, 3)
    K = T_V ** (N - 1)
    result = rnnjax.beam_search(model, params, SOURCE, lengths=SOURCE_LENGTHS, num_steps=N, beam_size=K)
    for b in range(len(SOURCE)):
        totals = teacher_forced_log_probs(model, params, SOURCE[b], SOURCE_LENGTHS[b], everything).sum(1)
        best = np.argsort(-totals)[:K]
        np.testing.assert_array_equal(result.tokens[b, 0], everything[best[0]])
        np.testing.assert_allclose(result.log_probs[b], totals[best], atol=1e-4)
        np.testing.assert_allclose(result.scores[b], totals[best], atol=1e-4)  # no length penalty


def test_beam_search_with_eos_and_length_penalty_by_enumeration():
    """Every output that repeats EOS after its first EOS, scored up to it and length-normalised (K covers all)."""
    T_V, N, EOS, alpha = 3, 3, 2, 1.5
    model, params = seq2seq("lstm", T_V)
    canonical = []
    for seq in itertools.product(range(T_V), repeat=N):
        first = seq.index(EOS) if EOS in seq else N
        if all(token == EOS for token in seq[first:]):
            canonical.append(seq)
    canonical = np.array(canonical, np.int32)  # 15 of the 27
    lengths = np.array([list(seq).index(EOS) + 1 if EOS in seq else N for seq in canonical])
    counted = np.arange(N)[None, :] < lengths[:, None]
    result = rnnjax.beam_search(
        model, params, SOURCE, lengths=SOURCE_LENGTHS, num_steps=N, beam_size=T_V**N, eos_id=EOS, length_penalty=alpha
    )
    for b in range(len(SOURCE)):
        log_p = teacher_forced_log_probs(model, params, SOURCE[b], SOURCE_LENGTHS[b], canonical)
        totals = np.where(counted, log_p, 0.0).sum(1)
        scores = totals / ((5 + lengths) / 6) ** alpha
        order = np.argsort(-scores)
        found = len(canonical)
        np.testing.assert_array_equal(result.tokens[b, :found], canonical[order])
        np.testing.assert_allclose(result.scores[b, :found], scores[order], atol=1e-4)
        np.testing.assert_allclose(result.log_probs[b, :found], totals[order], atol=1e-4)
        np.testing.assert_array_equal(result.lengths[b, :found], lengths[order])
        assert np.all(np.isneginf(result.scores[b, found:]))  # fewer distinct outputs than beams


def reference_beam_search(model, params, source_row, length, *, num_steps, beam_size, eos_id, length_penalty):
    """Beam search over Python lists, each prefix scored by teacher forcing the whole model."""
    beams = [((), 0.0, False)]  # (tokens, log-probability, finished)
    for _ in range(num_steps):
        candidates = []
        for tokens, total, finished in beams:
            if finished:
                candidates.append((tokens + (eos_id,), total, True))
                continue
            # Teacher forcing is causal: the logits after `tokens` ignore the placeholders that pad it to N.
            probe = np.array([tokens + (0,) * (num_steps - len(tokens))], np.int32)
            logits = teacher_forced_logits(model, params, jnp.asarray(source_row[None]), jnp.array([length]), probe)
            log_p = np.asarray(jax.nn.log_softmax(logits[0, len(tokens)]), np.float64)
            candidates += [(tokens + (v,), total + log_p[v], v == eos_id) for v in range(len(log_p))]
        beams = sorted(candidates, key=lambda c: -c[1])[:beam_size]
    lengths = [tokens.index(eos_id) + 1 if eos_id in tokens else num_steps for tokens, _, _ in beams]
    scored = [(total / ((5 + n) / 6) ** length_penalty, tokens) for (tokens, total, _), n in zip(beams, lengths)]
    return sorted(scored, key=lambda s: -s[0])


@pytest.mark.parametrize("name", ["gru", pytest.param("transformer", marks=pytest.mark.slow)])
def test_beam_search_equals_a_python_beam_search(name):
    model, params = seq2seq(name, 7)
    options = dict(num_steps=4, beam_size=3, eos_id=2, length_penalty=0.6)
    result = rnnjax.beam_search(model, params, SOURCE, lengths=SOURCE_LENGTHS, **options)
    for b in range(len(SOURCE)):
        want = reference_beam_search(model, params, SOURCE[b], SOURCE_LENGTHS[b], **options)
        np.testing.assert_array_equal(result.tokens[b], [tokens for _, tokens in want])
        np.testing.assert_allclose(result.scores[b], [score for score, _ in want], atol=1e-4)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(beam_size=0), "beam_size"),
        (dict(num_steps=-1), "num_steps"),
        (dict(eos_id=7), "eos_id"),
        (dict(length_penalty=-1.0), "length_penalty"),
        (dict(source=np.array([[1, V_IN]])), "source must be ids"),
        (dict(source=np.ones((2, 3), np.float32)), "source must be"),
    ],
)
def test_beam_search_names_bad_arguments(options, match):
    model, params = seq2seq("gru", 7)
    arguments = dict(source=SOURCE[:, :2], num_steps=2, beam_size=2) | options
    with pytest.raises(ValueError, match=match):
        rnnjax.beam_search(model, params, arguments.pop("source"), **arguments)


def test_beam_search_needs_a_seq2seq_model():
    model, params = language_model("lstm")
    with pytest.raises(ValueError, match="rnnjax.generate"):
        rnnjax.beam_search(model, params, SOURCE, num_steps=2, beam_size=2)


# CharLM.encode and the command line.


def test_charlm_encode_inverts_decode_and_matches_the_corpus_encoding():
    from rnnjax.tasks.charlm import encode_corpus, load_corpus

    task = tasks.get("charlm")
    text = load_corpus(task.corpus)[:2000]
    np.testing.assert_array_equal(task.encode(text), encode_corpus(task.corpus, task.min_count)[0][:2000])
    assert task.decode(task.encode("for x in range(3):")) == "for x in range(3):"
    unknown = task.encode("a\u4e2db")
    assert unknown.dtype == np.int32 and unknown[1] == 0 and task.decode(unknown) == "a?b"
    with pytest.raises(TypeError, match="text"):
        task.encode([1, 2])


@pytest.mark.slow
def test_cli_generates_from_a_charlm_run(tmp_path, capsys):
    charlm_run = tmp_path / "charlm"
    args = ["--task", "charlm", "--task-opt", "seq_len=16", "--task-opt", "eval_size=8", "--hidden", "16"]
    assert (
        cli_main(["train", *args, "--batch-size", "4", "--steps", "3", "--no-progress", "--ckpt-dir", str(charlm_run)])
        == 0
    )
    capsys.readouterr()
    common = ["generate", "--run-dir", str(charlm_run), "--prompt", "def ", "--max-new-tokens", "12"]
    assert cli_main([*common, "--temperature", "0"]) == 0
    greedy = capsys.readouterr().out
    restored = rnnjax.train.restore_run(charlm_run)
    want = rnnjax.generate(
        restored.model, restored.state.params, restored.task.encode("def "), max_new_tokens=12, temperature=0
    )
    assert greedy == "def " + restored.task.decode(want) + "\n"

    sample = [*common, "--top-k", "5", "--top-p", "0.9", "--seed", "3", "--num-samples", "2"]
    assert cli_main(sample) == 0
    printed = capsys.readouterr().out
    prompts = np.repeat(restored.task.encode("def ")[None], 2, axis=0)
    rows = rnnjax.generate(restored.model, restored.state.params, prompts, max_new_tokens=12, top_k=5, top_p=0.9, key=3)
    assert printed == "".join(
        f"--- sample {i + 1} ---\ndef {restored.task.decode(row)}\n" for i, row in enumerate(rows)
    )


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--top-p", "1.5"], "top_p"),
        (["--temperature", "-1"], "temperature"),
        (["--num-samples", "0"], "--num-samples"),
        (["--prompt", ""], "--prompt"),
        (["--max-new-tokens", "-1"], "--max-new-tokens"),
    ],
)
def test_cli_names_bad_arguments_before_restoring(tmp_path, capsys, extra, match):
    assert cli_main(["generate", "--run-dir", str(tmp_path / "none"), "--prompt", "a", *extra]) == 2
    assert match in capsys.readouterr().err


def test_cli_reports_a_missing_run(tmp_path, capsys):
    assert cli_main(["generate", "--run-dir", str(tmp_path / "none"), "--prompt", "a"]) == 2
    assert "no checkpoint directory" in capsys.readouterr().err
