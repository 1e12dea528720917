"""The ``Examples:`` blocks of the TorchRL objectives run as written (TorchRL's own
objectives carry a runnable example; so do CP3ERLoss and ConsistencyRegularizedLoss)."""

from __future__ import annotations

import doctest

import agents.consistency_policy


def test_the_loss_modules_examples_run() -> None:
    result = doctest.testmod(agents.consistency_policy, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 2 and result.failed == 0, result
