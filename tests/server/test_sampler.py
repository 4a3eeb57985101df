"""Next-token choice: greedy rows, temperature / top-k / top-p sampling, seeded generators."""

from collections import Counter

import pytest
import torch

from loraquilt.server.request import SamplingParams
from loraquilt.server.sampler import new_generator, sample_next_tokens

GREEDY = SamplingParams()
DRAWS = 2000


def logits_from_probs(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float32).log()


def draw_many(logits_row: torch.Tensor, params: SamplingParams, seed: int = 0, draws: int = DRAWS) -> Counter:
    """Sample one row repeatedly with a single seeded generator; returns token counts."""
    generator = new_generator(seed)
    logits = logits_row.unsqueeze(0)
    return Counter(sample_next_tokens(logits, [params], [generator])[0] for _ in range(draws))


def random_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


# -- greedy -----------------------------------------------------------------------------------


def test_greedy_rows_take_the_argmax():
    logits = random_logits(6, 50, seed=1)
    tokens = sample_next_tokens(logits, [GREEDY] * 6, [None] * 6)
    assert tokens == logits.argmax(dim=-1).tolist()
    assert all(isinstance(token, int) for token in tokens)


def test_greedy_rows_take_the_argmax_in_a_mixed_batch():
    logits = random_logits(6, 50, seed=2)
    sampled = SamplingParams(temperature=1.0, seed=5)
    params = [GREEDY, sampled, GREEDY, sampled, sampled, GREEDY]
    generators = [None if p.greedy else new_generator(i) for i, p in enumerate(params)]
    tokens = sample_next_tokens(logits, params, generators)
    expected = logits.argmax(dim=-1).tolist()
    for row in (0, 2, 5):
        assert tokens[row] == expected[row]
    assert all(0 <= token < 50 for token in tokens)


def test_greedy_does_not_consume_the_generator():
    generator = new_generator(3)
    before = generator.getstate()
    sample_next_tokens(random_logits(1, 10, seed=0), [GREEDY], [generator])
    assert generator.getstate() == before


@pytest.mark.parametrize("temperature", [0.01, 1.0, 100.0])
def test_top_k_one_is_greedy_whatever_the_temperature(temperature):
    logits = random_logits(1, 64, seed=3)[0]
    counts = draw_many(logits, SamplingParams(temperature=temperature, top_k=1), draws=200)
    assert set(counts) == {int(logits.argmax())}


@pytest.mark.parametrize("temperature", [0.5, 1.0, 50.0])
def test_tiny_top_p_is_greedy(temperature):
    logits = random_logits(1, 64, seed=4)[0]
    counts = draw_many(logits, SamplingParams(temperature=temperature, top_p=1e-6), draws=200)
    assert set(counts) == {int(logits.argmax())}


# -- top-k / top-p ----------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 5, 10])
def test_top_k_never_picks_outside_the_k_best(k):
    logits = random_logits(1, 40, seed=5)[0]
    best = set(torch.topk(logits, k).indices.tolist())
    # a high temperature spreads the draws so that all of the k best come up
    counts = draw_many(logits, SamplingParams(temperature=5.0, top_k=k), draws=1000)
    assert set(counts) <= best
    assert len(counts) == k


def test_top_k_larger_than_vocab_is_no_restriction():
    logits = torch.zeros(5)
    counts = draw_many(logits, SamplingParams(temperature=1.0, top_k=50), draws=500)
    assert set(counts) == set(range(5))


def test_top_p_keeps_the_nucleus_and_renormalises():
    """probs 0.4/0.3/0.2/0.1 with top_p=0.5: token 2 is dropped since 0.4+0.3 already reaches
    0.5; the draws follow 0.4/0.7 vs 0.3/0.7."""
    logits = logits_from_probs([0.4, 0.3, 0.2, 0.1])
    counts = draw_many(logits, SamplingParams(temperature=1.0, top_p=0.5), seed=1234)
    assert set(counts) == {0, 1}
    assert counts[0] / DRAWS == pytest.approx(0.4 / 0.7, abs=0.04)
    assert counts[1] / DRAWS == pytest.approx(0.3 / 0.7, abs=0.04)


def test_top_p_stops_at_the_first_token_reaching_it():
    """top_p=0.4: the first token alone reaches it, the second is dropped."""
    logits = logits_from_probs([0.3, 0.45, 0.15, 0.1])  # unsorted on purpose
    counts = draw_many(logits, SamplingParams(temperature=1.0, top_p=0.4), draws=300)
    assert set(counts) == {1}


def test_top_p_one_keeps_every_token():
    logits = logits_from_probs([0.4, 0.3, 0.2, 0.1])
    counts = draw_many(logits, SamplingParams(temperature=1.0, top_p=1.0), seed=7)
    assert set(counts) == {0, 1, 2, 3}
    for token, prob in enumerate([0.4, 0.3, 0.2, 0.1]):
        assert counts[token] / DRAWS == pytest.approx(prob, abs=0.04)


def test_top_k_and_top_p_combine():
    """top_k=3 leaves 0.4/0.3/0.2 (renormalised 4/9, 3/9, 2/9); top_p=0.75 then keeps the
    first two, since 4/9 + 3/9 > 0.75."""
    logits = logits_from_probs([0.4, 0.3, 0.2, 0.1])
    counts = draw_many(logits, SamplingParams(temperature=1.0, top_k=3, top_p=0.75), seed=8)
    assert set(counts) == {0, 1}


# -- temperature ------------------------------------------------------------------------------


def test_temperature_one_follows_the_softmax():
    probs = [0.5, 0.25, 0.15, 0.1]
    counts = draw_many(logits_from_probs(probs), SamplingParams(temperature=1.0), seed=11)
    for token, prob in enumerate(probs):
        assert counts[token] / DRAWS == pytest.approx(prob, abs=0.04)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_scales_the_logits(temperature):
    """Sampling at temperature T draws from softmax(logits / T) ∝ probs ** (1 / T)."""
    probs = [0.5, 0.25, 0.15, 0.1]
    scaled = [p ** (1 / temperature) for p in probs]
    expected = [s / sum(scaled) for s in scaled]
    counts = draw_many(logits_from_probs(probs), SamplingParams(temperature=temperature), seed=12)
    for token, prob in enumerate(expected):
        assert counts[token] / DRAWS == pytest.approx(prob, abs=0.04)


def test_high_temperature_flattens_the_distribution():
    logits = logits_from_probs([0.7, 0.15, 0.1, 0.05])
    cold = draw_many(logits, SamplingParams(temperature=0.3), seed=13)
    hot = draw_many(logits, SamplingParams(temperature=5.0), seed=13)
    assert cold[0] > 0.95 * DRAWS
    assert hot[0] < 0.45 * DRAWS
    assert min(hot[t] for t in range(4)) > 0.1 * DRAWS
    assert min(hot[t] for t in range(4)) > min(cold[t] for t in range(4))


def test_tiny_positive_temperature_behaves_like_greedy():
    """SamplingParams accepts any finite temperature > 0; a vanishing one should pick the argmax."""
    logits = torch.tensor([[1.0, 3.0, -2.0, 0.5]])
    params = SamplingParams(temperature=1e-300)
    assert params.temperature > 0
    assert sample_next_tokens(logits, [params], [new_generator(0)]) == [1]


# -- seeds and batch independence -------------------------------------------------------------


def draw_sequence(logits: torch.Tensor, params: SamplingParams, generator, steps: int):
    return [sample_next_tokens(logits, [params], [generator])[0] for _ in range(steps)]


def test_same_seed_gives_the_same_draws():
    logits = random_logits(1, 100, seed=20) * 0.1  # nearly flat: draws vary a lot
    params = SamplingParams(temperature=1.0, seed=42)
    first = draw_sequence(logits, params, new_generator(42), 64)
    second = draw_sequence(logits, params, new_generator(42), 64)
    assert first == second
    assert len(set(first)) > 10


@pytest.mark.parametrize("seeds", [(1, 2), (0, 2**63 - 1), (2**64 - 1, 7)])
def test_different_seeds_give_different_draws(seeds):
    logits = random_logits(1, 100, seed=21) * 0.1
    params = SamplingParams(temperature=1.0)
    draws = [draw_sequence(logits, params, new_generator(seed), 64) for seed in seeds]
    assert draws[0] != draws[1]


def test_seeds_a_multiple_of_2_pow_63_apart_give_different_draws():
    logits = random_logits(1, 100, seed=21) * 0.1
    params = SamplingParams(temperature=1.0)
    low = draw_sequence(logits, params, new_generator(5), 64)
    high = draw_sequence(logits, params, new_generator(5 + 2**63), 64)
    assert low != high


def test_unseeded_generators_differ():
    logits = random_logits(1, 100, seed=22) * 0.1
    params = SamplingParams(temperature=1.0)
    assert draw_sequence(logits, params, new_generator(None), 64) != draw_sequence(
        logits, params, new_generator(None), 64
    )


@pytest.mark.parametrize(
    "partner",
    [
        SamplingParams(temperature=1.0, seed=1),
        SamplingParams(temperature=0.7, top_k=5, seed=1),
        SamplingParams(temperature=1.0, top_p=0.3, seed=99),
        GREEDY,
    ],
    ids=["same-seed", "top-k", "top-p", "greedy"],
)
@pytest.mark.parametrize("partner_first", [False, True])
def test_row_draws_do_not_depend_on_the_batch(partner, partner_first):
    """A seeded row draws the same tokens alone and batched with another request."""
    vocab, steps = 80, 40
    logits_a = random_logits(1, vocab, seed=30) * 0.3
    logits_b = random_logits(1, vocab, seed=31)
    params_a = SamplingParams(temperature=1.2, top_k=40, top_p=0.9, seed=1)

    alone = draw_sequence(logits_a, params_a, new_generator(1), steps)

    gen_a, gen_b = new_generator(1), None if partner.greedy else new_generator(partner.seed)
    if partner_first:
        batch, params, generators, row = torch.cat([logits_b, logits_a]), [partner, params_a], [gen_b, gen_a], 1
    else:
        batch, params, generators, row = torch.cat([logits_a, logits_b]), [params_a, partner], [gen_a, gen_b], 0
    batched = [sample_next_tokens(batch, params, generators)[row] for _ in range(steps)]
    assert batched == alone
    assert len(set(alone)) > 5


def test_new_generator_accepts_the_full_seed_range():
    for seed in (0, 1, 2**63 - 1, 2**63, 2**64 - 1):
        generator = new_generator(seed)
        assert 0.0 <= generator.random() < 1.0
