"""IFALNet's method entry (method_ifalnet.py): recipe, schedule, the four views' chains and the eight
test-time similarity modes against the official test's matrices."""
import pytest

import utils


def official_ifalnet_lr(epoch):
    """IFALNet train.py adjust_learning_rate (METHODS.md 2.5), for lr 0.1."""
    if epoch < 10:
        return 0.1 * (epoch + 1) / 10
    if epoch < 20:
        return 0.1
    if epoch < 60:
        return 0.01
    if epoch < 90:
        return 0.001
    return 0.0001


def test_the_ifalnet_schedule_is_the_official_one_and_agw_deen_keep_theirs():
    factor = utils.FIXED_LR_SCHEDULES["ifalnet"]
    for epoch in range(121):
        assert 0.1 * factor(epoch) == pytest.approx(official_ifalnet_lr(epoch), rel=1e-12), epoch
    assert [utils.FIXED_LR_SCHEDULES["agw"](e) for e in (9, 19, 20, 49, 50, 120)] == [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    assert [utils.FIXED_LR_SCHEDULES["deen"](e) for e in (20, 79, 80, 150)] == [0.1, 0.1, 0.01, 0.01]
