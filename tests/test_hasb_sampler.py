"""HASB roulette sampler: probabilities, sigma schedule, determinism, bad input, Trainer callback."""


import pytest

from abs_llm import DoubleRoundingConfig, get_bits, hasb, quantize, switchable_layers


def _model_and_traces(tiny_llama):
    quantize(tiny_llama, DoubleRoundingConfig(bits=8, candidate_bits=[8, 4, 2]))
    names = list(switchable_layers(tiny_llama))
    return tiny_llama, {n: float(i) for i, n in enumerate(names)}  # mean = (L-1)/2: the later half is sensitive


def test_sampler_probabilities_and_schedule(tiny_llama):
    model, tr = _model_and_traces(tiny_llama)
    s = hasb.HASBSampler(model, tr, sigma_schedule="linear", seed=0)
    names = list(tr)
    assert s.probabilities(names[-1]) == pytest.approx({8: 8 / 14, 4: 4 / 14, 2: 2 / 14})
    assert s.probabilities(names[0]) == pytest.approx({8: 1 / 3, 4: 1 / 3, 2: 1 / 3})
    assert s.step(0.0) == {n: 8 for n in names}  # sigma(0) = 0: nothing resampled
    assert set(s.sample(0.0, base_bits=2).values()) == {2}
    counts = {n: {8: 0, 4: 0, 2: 0} for n in names}
    for _ in range(3000):
        for n, b in s.sample(1.0).items():
            counts[n][b] += 1
    for n in names:
        freq = {b: c / 3000 for b, c in counts[n].items()}
        assert freq == pytest.approx(s.probabilities(n), abs=0.04)
    applied = s.step(1.0)
    assert get_bits(model) == applied or len(set(applied.values())) == 1
    assert hasb.HASBSampler(model, tr, seed=5).sample(0.7) == hasb.HASBSampler(model, tr, seed=5).sample(0.7)


def test_sampler_bad_input_and_callback(tiny_llama):
    model, tr = _model_and_traces(tiny_llama)
    with pytest.raises(ValueError, match="not a candidate bit-width"):
        hasb.HASBSampler(model, tr, candidate_bits=[8, 3])
    with pytest.raises(ValueError, match="sigma_schedule"):
        hasb.HASBSampler(model, tr, sigma_schedule="exp")
    s = hasb.HASBSampler(model, tr, sigma_schedule=1.0)
    cb = hasb.HASBCallback(s)

    class State:
        global_step, max_steps = 5, 10

    cb.on_step_begin(None, State(), None)
    assert get_bits(model) == s.current or len(set(s.current.values())) == 1
