"""Token-level vs sequence-level geometric mixture, on two tabular causal LMs where everything can be enumerated.

The vocabulary is ``BOS, a, b, EOS``; each model's next-token distribution depends only on the previous token. With
``max_new_tokens = 2`` a response is one of ``EOS, aEOS, bEOS, aa, ab, ba, bb`` (the last four cut at the length
limit), so every distribution over responses is a 7-vector and the sequence-level mixture
``pi*(y) ~ pi_A(y) ** 0.7 * pi_B(y) ** 0.3`` (q = 0.3, asymmetric on purpose) is computed exactly. The checks:

* the token-level mixture ``m`` (what :class:`GeometricMixtureLM` samples) is far from ``pi*``: the naming matters;
* ``pi*(y) / m(y)`` is proportional to ``prod_t Z_t(y)`` and ``generate(..., return_log_weights=True)`` returns
  exactly that product's log for every sampled response (EOS step included, padding after it excluded);
* self-normalised importance sampling with these weights recovers ``E_pi*[f]`` (and resampling recovers ``pi*``),
  which the unweighted token-level average misses.
"""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from sacpo_lightning.importance import effective_sample_size, normalized_weights, resample, snis_mean
from sacpo_lightning.models.mixture import (
    GeometricMixtureLM,
    MixtureSamples,
    geometric_mixture_log_normalizer,
    geometric_mixture_logprobs,
)

BOS, A, B, EOS = 0, 1, 2, 3
Q = 0.3
MAX_NEW = 2
NUM_SAMPLES = 6000
PAD = A  # a pad id that is a real token: its (masked) step must not leak into the weights

# Next-token probabilities over (BOS, a, b, EOS), one row per previous token; BOS is never generated. After "a" the
# models disagree sharply (Z small), after "b" they nearly agree (Z near 1), so the sequence-level mixture moves mass
# away from responses starting with "a". The EOS rows differ too, so a weight that counted the step after an EOS
# (a finished row's padding) would be wrong.
TABLE_A = [
    [0.0, 0.60, 0.30, 0.10],  # after BOS
    [0.0, 0.90, 0.05, 0.05],  # after a
    [0.0, 0.30, 0.30, 0.40],  # after b
    [0.0, 0.50, 0.25, 0.25],  # after EOS (only seen by finished rows)
]
TABLE_B = [
    [0.0, 0.30, 0.40, 0.30],
    [0.0, 0.05, 0.05, 0.90],
    [0.0, 0.25, 0.35, 0.40],
    [0.0, 0.10, 0.10, 0.80],
]


class TabularLM(torch.nn.Module):
    """A causal LM whose next-token logits are a table row picked by the previous token (so no KV cache is needed).

    It takes the arguments :meth:`GeometricMixtureLM.generate` passes (mask, positions, cache, ``logits_to_keep``)
    and returns ``CausalLMOutputWithPast`` with ``(B, S, V)`` float64 logits.
    """

    def __init__(self, probs: list[list[float]]) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor(probs, dtype=torch.float64).log(), requires_grad=False)
        self.config = SimpleNamespace(eos_token_id=EOS)

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                logits_to_keep=0):
        logits = self.logits[input_ids]
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return CausalLMOutputWithPast(logits=logits, past_key_values=past_key_values)


def _probs(table: list[list[float]]) -> torch.Tensor:
    return torch.tensor(table, dtype=torch.float64)


def _responses() -> list[tuple[int, ...]]:
    """Every response of at most MAX_NEW tokens: ended by EOS, or cut at the length limit."""
    out: list[tuple[int, ...]] = [(EOS,)]
    out += [(t, EOS) for t in (A, B)]
    out += list(itertools.product((A, B), repeat=2))
    return out


def _sequence_prob(table: torch.Tensor, y: tuple[int, ...]) -> float:
    """Probability of the event ``y`` (a whole response, or a prefix for one cut at the limit)."""
    prev, p = BOS, 1.0
    for tok in y:
        p *= float(table[prev, tok])
        prev = tok
    return p


def _z(prev: int) -> float:
    """The token-level normaliser ``sum_v pA(v | prev) ** (1 - q) * pB(v | prev) ** q``, straight from the tables."""
    pa, pb = _probs(TABLE_A)[prev], _probs(TABLE_B)[prev]
    return float((pa ** (1 - Q) * pb**Q).sum())


def _product_of_z(y: tuple[int, ...]) -> float:
    prev, w = BOS, 1.0
    for tok in y:
        w *= _z(prev)
        prev = tok
    return w


def _exact() -> dict[str, list[float]]:
    """``pi*`` (sequence-level), ``m`` (token-level, from the library) and ``prod Z`` over :func:`_responses`."""
    ys = _responses()
    pa, pb = _probs(TABLE_A), _probs(TABLE_B)
    unnorm = [_sequence_prob(pa, y) ** (1 - Q) * _sequence_prob(pb, y) ** Q for y in ys]
    total = sum(unnorm)
    token_level = geometric_mixture_logprobs(pa.log(), pb.log(), Q).exp()  # (V, V): row = previous token
    return {
        "target": [u / total for u in unnorm],
        "token_level": [_sequence_prob(token_level, y) for y in ys],
        "w": [_product_of_z(y) for y in ys],
    }


@pytest.fixture(scope="module")
def mixture() -> GeometricMixtureLM:
    return GeometricMixtureLM(TabularLM(TABLE_A), TabularLM(TABLE_B), Q)


@pytest.fixture(scope="module")
def sampled(mixture) -> tuple[list[tuple[int, ...]], torch.Tensor]:
    """NUM_SAMPLES responses of the token-level mixture (as response tuples) and their log-weights."""
    prompts = torch.full((NUM_SAMPLES, 1), BOS)
    out = mixture.generate(prompts, max_new_tokens=MAX_NEW, do_sample=True, pad_token_id=PAD,
                           generator=torch.Generator().manual_seed(0), return_log_weights=True)
    assert isinstance(out, MixtureSamples) and out.log_weights.dtype == torch.float64
    responses = []
    for row in out.sequences[:, 1:].tolist():
        responses.append(tuple(row[: row.index(EOS) + 1]) if EOS in row else tuple(row))
    return responses, out.log_weights


def test_token_level_mixture_is_not_the_sequence_level_mixture():
    exact = _exact()
    target, token_level, w = exact["target"], exact["token_level"], exact["w"]
    assert sum(target) == pytest.approx(1.0) and sum(token_level) == pytest.approx(1.0)
    tv = 0.5 * sum(abs(p - m) for p, m in zip(target, token_level, strict=True))
    assert tv > 0.1, f"the example should separate the two mixtures, TV = {tv:.3f}"
    # pi*(y) / m(y) = prod_t Z_t(y) / const: the ratio is the same constant for every response.
    ratios = [p / (m * wy) for p, m, wy in zip(target, token_level, w, strict=True)]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-12)
    # The library's per-position normaliser is the same Z.
    z = geometric_mixture_log_normalizer(_probs(TABLE_A).log(), _probs(TABLE_B).log(), Q).exp()
    torch.testing.assert_close(z, torch.tensor([_z(prev) for prev in range(4)], dtype=torch.float64))


def test_generate_log_weights_are_the_product_of_normalisers(sampled):
    responses, log_w = sampled
    exact = dict(zip(_responses(), _exact()["w"], strict=True))
    assert set(responses) == set(exact), "every response should occur among the samples"
    got = log_w.exp().tolist()
    for y, w in zip(responses, got, strict=True):
        assert w == pytest.approx(exact[y], abs=1e-6), y
    assert (log_w <= 0).all()  # Z_t <= 1 (Hoelder), so W <= 1


def test_snis_recovers_the_sequence_level_expectation(sampled):
    """E[number of b tokens]: SNIS with log W hits the pi* value, the plain (token-level) average does not."""
    responses, log_w = sampled
    ys = _responses()
    exact = _exact()

    def f(y):
        return float(sum(tok == B for tok in y))

    target_value = sum(p * f(y) for p, y in zip(exact["target"], ys, strict=True))
    token_value = sum(m * f(y) for m, y in zip(exact["token_level"], ys, strict=True))
    assert abs(target_value - token_value) > 0.1  # the near-miss the test must catch
    values = torch.tensor([f(y) for y in responses], dtype=torch.float64)
    estimate, ess = snis_mean(values, log_w)
    assert float(estimate) == pytest.approx(target_value, abs=0.03)
    assert float(values.mean()) == pytest.approx(token_value, abs=0.03)
    assert abs(float(values.mean()) - target_value) > 0.07
    assert float(ess) == pytest.approx(float(effective_sample_size(log_w)))
    assert NUM_SAMPLES / 2 < float(ess) < NUM_SAMPLES
    assert float(normalized_weights(log_w).sum()) == pytest.approx(1.0)

    # Sampling-importance-resampling: the resampled responses are distributed as pi*, not as m.
    picks = resample(log_w, NUM_SAMPLES, generator=torch.Generator().manual_seed(1)).tolist()
    for y, p in zip(ys, exact["target"], strict=True):
        freq = sum(responses[i] == y for i in picks) / NUM_SAMPLES
        assert freq == pytest.approx(p, abs=0.03), y
    # Responses starting with "a" (where the models disagree): their share moves from m's to pi*'s.
    starts_a = [y[0] == A for y in ys]
    p_a = sum(p for p, s in zip(exact["target"], starts_a, strict=True) if s)
    m_a = sum(m for m, s in zip(exact["token_level"], starts_a, strict=True) if s)
    assert m_a - p_a > 0.1
    assert sum(responses[i][0] == A for i in picks) / NUM_SAMPLES == pytest.approx(p_a, abs=0.03)
    assert sum(y[0] == A for y in responses) / NUM_SAMPLES == pytest.approx(m_a, abs=0.03)


@pytest.mark.parametrize("q", [0.0, 1.0])
def test_endpoints_have_zero_log_weight(q):
    mixture = GeometricMixtureLM(TabularLM(TABLE_A), TabularLM(TABLE_B), q)
    out = mixture.generate(torch.full((64, 1), BOS), max_new_tokens=MAX_NEW, do_sample=True,
                           generator=torch.Generator().manual_seed(0), return_log_weights=True)
    assert torch.equal(out.log_weights, torch.zeros(64, dtype=torch.float64))


def test_default_return_type_is_unchanged(mixture):
    kwargs = {"max_new_tokens": MAX_NEW, "do_sample": True, "pad_token_id": PAD}
    plain = mixture.generate(torch.full((8, 1), BOS), generator=torch.Generator().manual_seed(3), **kwargs)
    weighted = mixture.generate(torch.full((8, 1), BOS), generator=torch.Generator().manual_seed(3),
                                return_log_weights=True, **kwargs)
    assert isinstance(plain, torch.Tensor) and torch.equal(plain, weighted.sequences)


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"do_sample": False}, "--do_sample"),
        ({"do_sample": True, "temperature": 0.7}, "--temperature"),
        ({"do_sample": True, "top_p": 0.9}, "--top_p"),
    ],
)
def test_sequence_level_weights_refuse_modified_sampling(mixture, kwargs, option):
    with pytest.raises(ValueError, match=option):
        mixture.generate(torch.full((2, 1), BOS), max_new_tokens=MAX_NEW, return_log_weights=True, **kwargs)
    # Without weights the same settings decode as before.
    assert mixture.generate(torch.full((2, 1), BOS), max_new_tokens=MAX_NEW, **kwargs).shape[0] == 2


def test_log_normaliser_is_zero_for_identical_models():
    logits = torch.randn(3, 5, dtype=torch.float64)
    torch.testing.assert_close(geometric_mixture_log_normalizer(logits, logits, Q), torch.zeros(3, dtype=torch.float64))
    assert math.isclose(float(geometric_mixture_log_normalizer(logits[0], logits[1], 0.0)), 0.0)
