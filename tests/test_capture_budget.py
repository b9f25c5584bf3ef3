"""The capture's byte budget (capture/budget.py): a token bucket on a clock the test holds."""

import pytest

from qtap_devtools.capture.budget import ByteBudget

MIB = 1 << 20


def test_a_burst_within_a_second_of_budget_passes_whole():
    b = ByteBudget(64 * MIB, now=0.0)
    b.spend(63 * MIB, now=0.01)
    assert not b.exhausted(0.01)
    b.spend(2 * MIB, now=0.02)
    assert b.exhausted(0.02)


def test_spending_past_the_budget_is_a_debt_paid_back_at_the_rate():
    b = ByteBudget(10 * MIB, now=0.0)
    b.spend(20 * MIB, now=0.0)  # 10 MiB of debt
    assert b.exhausted(0.5)  # 5 MiB refilled: still owing
    assert not b.exhausted(1.01)
    # Resuming needs a quarter of the bucket back, not the first byte.
    assert not b.recovered(1.01)
    assert b.recovered(1.26)


def test_the_bucket_never_holds_more_than_its_burst():
    b = ByteBudget(1 * MIB, now=0.0)
    assert not b.exhausted(3600.0)  # an hour idle
    b.spend(MIB + 1, now=3600.0)
    assert b.exhausted(3600.0)


def test_a_clock_that_goes_back_refills_nothing():
    b = ByteBudget(1 * MIB, now=10.0)
    b.spend(MIB, now=10.0)
    assert b.exhausted(5.0)
    assert b.tokens == 0


def test_steady_overload_passes_about_the_rate():
    """Shedding on when exhausted, off when recovered, as Capture.check_load does:
    offered 2 GB/s, what passes averages the budget."""
    rate, offered, step = 64 * MIB, 2000 * MIB, 0.001
    b = ByteBudget(rate, now=0.0)
    shedding, passed, t = False, 0, 0.0
    for _ in range(10_000):  # 10 s
        t += step
        if not shedding:
            n = int(offered * step)
            b.spend(n, t)
            passed += n
            shedding = b.exhausted(t)
        else:
            shedding = not b.recovered(t)
    assert 0.9 * rate * 10 <= passed <= 1.1 * rate * 10 + b.capacity


@pytest.mark.parametrize("rate", [0, -1])
def test_a_budget_must_be_positive(rate):
    with pytest.raises(ValueError):
        ByteBudget(rate)
