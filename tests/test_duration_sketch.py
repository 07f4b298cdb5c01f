"""Per-tool duration sketches: bounded memory, hand-checked quantiles, the estimator's distribution."""
from __future__ import annotations

import pytest

from infercept_hf.duration_sketch import DurationSketch, quantile
from infercept_hf.estimator import DurationEstimator


def test_quantile_interpolates_between_order_statistics():
    values = [1.0, 2.0, 3.0, 4.0]
    assert quantile(values, 0.0) == 1.0
    assert quantile(values, 1.0) == 4.0
    assert quantile(values, 0.5) == 2.5  # position 1.5: halfway between 2 and 3
    assert quantile(values, 0.1) == pytest.approx(1.3)  # position 0.3
    assert quantile([7.0], 0.9) == 7.0


def test_quantile_refuses_bad_input():
    with pytest.raises(ValueError, match="quantile of no values"):
        quantile([], 0.5)
    with pytest.raises(ValueError, match=r"q must be in \[0, 1\], got 1.5"):
        quantile([1.0], 1.5)


def test_sketch_keeps_only_the_most_recent_durations():
    sketch = DurationSketch(capacity=3)
    for d in [5.0, 1.0, 4.0, 2.0, 3.0]:  # 5 and 1 fall out, oldest first
        sketch.add(d)
    assert len(sketch) == 3
    assert sketch.sorted() == [2.0, 3.0, 4.0]
    assert sketch.quantile(0.5) == 3.0
    sketch.add(10.0)  # overwrites the oldest kept (4.0)
    assert sketch.sorted() == [2.0, 3.0, 10.0]


def test_outliving_keeps_the_longer_calls():
    sketch = DurationSketch()
    for d in [1.0, 2.0, 3.0, 10.0]:
        sketch.add(d)
    assert sketch.outliving(2.0) == [3.0, 10.0]  # a call that lasted 2 s is not one of the 1 s or 2 s ones
    assert sketch.outliving(10.0) == []


def test_sketch_refuses_a_bad_capacity():
    with pytest.raises(ValueError, match="capacity must be >= 1, got 0"):
        DurationSketch(0)
    with pytest.raises(ValueError, match="capacity must be >= 1, got 0"):
        DurationEstimator(sketch_capacity=0)


def test_estimator_distribution_of_the_rest_of_a_pause():
    est = DurationEstimator(sketch_capacity=4)
    for d in [1.0, 2.0, 3.0, 10.0]:
        est.observe("search", d)
    assert est.remaining_distribution("search", 2.5) == [0.5, 7.5]
    assert est.remaining_distribution("search", 11.0) == []  # outlived them all: callers use the online rule
    assert est.remaining_distribution("never-seen", 0.0) == []
    assert est.duration_quantile("search", 0.5) == 2.5
    assert est.duration_quantile("never-seen", 0.5) is None
    est.observe("search", 4.0)  # bounded: the 1 s call is forgotten
    assert est.remaining_distribution("search", 0.0) == [2.0, 3.0, 4.0, 10.0]
    assert est.snapshot()["search"]["quartiles_s"] == [2.75, 3.5, 5.5]


def test_oracle_distribution_is_the_true_rest():
    est = DurationEstimator(oracle=True)
    assert est.remaining_distribution("t", 1.5, true_duration=4.0) == [2.5]
    assert est.duration_quantile("t", 0.05, true_duration=4.0) == 4.0
    with pytest.raises(ValueError, match="oracle mode needs the call's true_duration"):
        est.duration_quantile("t", 0.5)
