"""bench/stats.py: error bars checked against hand-computed numbers."""

import pytest

from frugalrl.bench.stats import bootstrap_ci, mean_ci, ratio_ci, t95


def test_mean_ci_by_hand():
    # values 1, 2, 3: mean 2, sd 1, n 3 -> half width t95(2) * 1 / sqrt(3) = 4.303 / 1.7321 = 2.4843
    est = mean_ci([1.0, 2.0, 3.0])
    assert (est.value, est.n) == (2.0, 3)
    assert est.low == pytest.approx(2 - 2.4843, abs=1e-4) and est.high == pytest.approx(2 + 2.4843, abs=1e-4)
    assert mean_ci([0.5]).low == mean_ci([0.5]).high == 0.5  # one value: no interval
    assert mean_ci([0.5]).as_summary("a") == {"a": 0.5, "a_ci_low": None, "a_ci_high": None}
    assert t95(40) == 1.96 and t95(1) == 12.706
    with pytest.raises(ValueError):
        mean_ci([])


def test_ratio_ci_brackets_the_ratio_and_pairing_narrows_it():
    num = [2.0, 4.0, 6.0, 8.0, 10.0]
    den = [1.0, 2.0, 3.0, 4.0, 5.0]  # every pair has ratio 2: paired resamples all give exactly 2
    paired = ratio_ci(num, den, paired=True)
    assert paired.value == 2.0 and paired.low == pytest.approx(2.0) and paired.high == pytest.approx(2.0)
    unpaired = ratio_ci(num, den)
    assert unpaired.value == 2.0 and unpaired.low < 2.0 < unpaired.high
    assert unpaired.as_summary("r") == {"r": 2.0, "r_ci_low": unpaired.low, "r_ci_high": unpaired.high}
    with pytest.raises(ValueError, match="one length"):
        ratio_ci([1.0, 2.0], [1.0], paired=True)


def test_bootstrap_ci_of_any_statistic():
    values = [1.0, 2.0, 3.0, 10.0]
    est = bootstrap_ci(lambda pick: float(max(values[i] for i in pick)), len(values))
    # the maximum of a resample lies among the values; about (3/4)^4 = 32 % of resamples miss the 10
    assert est.value == 10.0 and est.n == 4 and est.low in values and est.high == 10.0 and est.low < 10.0
    assert bootstrap_ci(lambda pick: None, 3) is None  # no value on the whole set: no figure
    single = bootstrap_ci(lambda pick: 5.0, 1)
    assert (single.value, single.low, single.high) == (5.0, 5.0, 5.0)
