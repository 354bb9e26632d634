"""Recovery in % of dense from two eval records, by hand-worked numbers."""
from __future__ import annotations

import pytest

from tierprune.tasks.recovery import recovery_pct

pytestmark = pytest.mark.unit


def _zero_shot(**accs: tuple[float, float | None]) -> dict:
    tasks = {name: {"acc": acc, "samples": 10, **({} if norm is None else {"acc_norm": norm})}
             for name, (acc, norm) in accs.items()}
    return {"tasks": tasks, "mean_acc": sum(t["acc"] for t in tasks.values()) / len(tasks)}


def test_ppl_recovery_is_dense_over_pruned_and_accuracy_is_pruned_over_dense() -> None:
    dense = {"ppl": 20.0, "zero_shot": _zero_shot(boolq=(0.8, None), arc_easy=(0.5, 0.4))}
    pruned = {"ppl": 25.0, "zero_shot": _zero_shot(boolq=(0.6, None), arc_easy=(0.5, 0.3))}
    out = recovery_pct(pruned, dense)
    assert out["ppl"] == pytest.approx(80.0)  # 20 / 25
    assert out["zero_shot"] == {"boolq": {"acc": pytest.approx(75.0)},
                                "arc_easy": {"acc": pytest.approx(100.0), "acc_norm": pytest.approx(75.0)}}
    assert out["zero_shot_mean_acc"] == pytest.approx(100 * 0.55 / 0.65)
    same = recovery_pct(dense, dense)
    assert same["ppl"] == 100.0 and same["zero_shot_mean_acc"] == 100.0


def test_missing_numbers_give_null_not_a_made_up_percentage() -> None:
    dense = {"ppl": 20.0, "zero_shot": _zero_shot(boolq=(0.0, None), rte=(0.5, None))}
    assert recovery_pct({"ppl": None}, dense) == {"ppl": None, "zero_shot": None, "zero_shot_mean_acc": None}
    out = recovery_pct({"ppl": 40.0, "zero_shot": _zero_shot(boolq=(0.5, None), rte=(0.25, None))}, dense)
    assert out["ppl"] == pytest.approx(50.0)
    assert out["zero_shot"] == {"boolq": {"acc": None}, "rte": {"acc": pytest.approx(50.0)}}  # dense acc 0: no ratio
    # Tasks the dense evaluation did not run have no recovery, and then neither has the mean.
    out = recovery_pct({"ppl": 40.0, "zero_shot": _zero_shot(rte=(0.5, None), piqa=(0.6, None))}, dense)
    assert out["zero_shot"] == {"rte": {"acc": pytest.approx(100.0)}} and out["zero_shot_mean_acc"] is None
