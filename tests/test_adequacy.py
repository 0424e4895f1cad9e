"""The judge of each arm's search: a best value at a range's edge, an expected best still falling at the last trial,
a searched parameter that cannot act; and a clean search that gets no flag."""

import pytest

from harness import stats
from harness.study.adequacy import (
    EDGE_MARGIN, STILL_FALLING, edge_flags, inert_flags, judge_search, last_trial_gain, still_falling_flag,
)
from harness.study.rules import SEARCH
from harness.study.spec import Range
from helpers import open_coordinator, tiny_study

pytestmark = pytest.mark.fast

SPACE = {"dropout.weight": Range(0.05, 0.5), "dropout.embedding": Range(0.0, 0.2), "train.lr": Range(1, 100, True)}


def test_a_best_rate_at_the_top_of_its_range_is_flagged_with_the_fix():
    (flag,) = edge_flags(SPACE, {"dropout.weight": 0.494})
    assert flag.kind == "edge" and flag.param == "dropout.weight"
    assert flag.text == "best weight 0.494 sits at the top of its range [0.05, 0.5]"
    assert flag.fix == "widen search.weight above 0.5"


def test_edges_are_judged_within_the_margin_on_the_ranges_own_scale():
    width = 0.5 - 0.05
    inside, outside = 0.05 + 0.99 * EDGE_MARGIN * width, 0.05 + 1.01 * EDGE_MARGIN * width
    assert [f.fix for f in edge_flags(SPACE, {"dropout.weight": inside})] == ["widen search.weight below 0.05"]
    assert edge_flags(SPACE, {"dropout.weight": outside}) == []
    # lr is searched on a log scale: 1.2 is 4% of the way from 1 to 100 there, 10 is halfway.
    assert [f.fix for f in edge_flags(SPACE, {"train.lr": 1.2})] == ["widen search.lr below 1"]
    assert edge_flags(SPACE, {"train.lr": 10.0}) == []
    assert [f.fix for f in edge_flags(SPACE, {"train.lr": 90.0})] == ["widen search.lr above 100"]


def test_a_rate_at_zero_is_an_answer_not_an_edge():
    # Dropout off (0) cannot be widened past: the search did find the lowest rate, which is a result.
    assert edge_flags(SPACE, {"dropout.embedding": 0.0}) == []
    assert [f.fix for f in edge_flags(SPACE, {"dropout.embedding": 0.199})] == ["widen search.embedding above 0.2"]


def test_the_last_trials_gain_is_the_drop_of_dodges_expected_best():
    values = [600.0, 560.0, 540.0]
    gain = last_trial_gain(values)
    assert gain == pytest.approx(stats.expected_best(values, 2)[0] - stats.expected_best(values, 3)[0])
    assert gain > 0 and last_trial_gain([500.0]) is None and last_trial_gain([500.0, 500.0]) == 0


def test_a_search_still_falling_is_flagged_and_a_converged_one_is_not():
    falling = still_falling_flag([600.0, 560.0, 540.0])
    assert falling is not None and falling.kind == "still_falling" and "trial 3" in falling.text
    assert falling.fix == "add search trials (budget.trials = 6)"
    # Ten trials within 0.2% of each other: the next trial would not change the best by more than noise.
    flat = [500.0 + 0.1 * i for i in range(10)]
    assert still_falling_flag(flat) is None
    assert last_trial_gain(flat) < STILL_FALLING * 500
    # Against the seeds' noise: a gain below the confirmation runs' sd is no sign of a search still improving.
    gain = last_trial_gain([600.0, 560.0, 540.0])
    assert still_falling_flag([600.0, 560.0, 540.0], noise=gain + 0.01) is None
    assert "the seeds' sd" in still_falling_flag([600.0, 560.0, 540.0], noise=gain - 0.01).text


def test_a_parameter_that_changes_nothing_is_flagged_as_inert():
    trials = [({"dropout.hidden": 0.1, "dropout.input": 0.3}, 512.5), ({"dropout.hidden": 0.6, "dropout.input": 0.3},
                                                                      512.5)]
    (flag,) = inert_flags({"dropout.hidden": Range(0.05, 0.7), "dropout.input": Range(0.1, 0.5)}, trials)
    assert flag.param == "dropout.hidden" and "cannot act" in flag.text
    assert inert_flags({"dropout.hidden": Range(0.05, 0.7)}, [trials[0], ({"dropout.hidden": 0.6}, 530.0)]) == []
    assert inert_flags({"dropout.hidden": Range(0.05, 0.7)}, trials[:1]) == []


def test_a_clean_search_gets_no_flag():
    space = {"dropout.weight": Range(0.05, 0.5)}
    finished = [({"dropout.weight": w}, v) for w, v in ((0.2, 520.0), (0.3, 518.0), (0.25, 517.9), (0.28, 517.95))]
    assert judge_search(space, {"dropout.weight": 0.25}, [v for _, v in finished], finished) == []
    flags = judge_search(space, {"dropout.weight": 0.49}, [600.0, 560.0, 540.0], finished[:2])
    assert [f.kind for f in flags] == ["edge", "still_falling"]


@pytest.mark.slow  # MLflow makes its SQLite store: seconds
def test_the_live_view_says_when_a_settled_search_sits_at_an_edge(tmp_path, test_corpus):
    # The paper rate (weight 0.3) is the top of the range here, and it is the best trial.
    study = tiny_study(tmp_path, test_corpus, trials=2, seeds="[1]",
                       edits=[("weight = [0.1, 0.5]", "weight = [0.05, 0.3]")])
    lines = []
    coordinator = open_coordinator(study, f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}",
                                   tmp_path / "runs", log=lines.append)
    ledger = coordinator.ledger
    first, second = ledger.claim("weight_only", SEARCH), ledger.claim("weight_only", SEARCH)
    assert first.params == {"dropout.weight": 0.3}
    ledger.finish(first, 500.0, {})
    ledger.finish(second, 520.0, {})
    coordinator._enqueue_confirmation("weight_only")
    said = [line for line in lines if "search-limited?" in line]
    assert len(said) == 1 and said[0].endswith("weight_only: search-limited? best weight 0.3 sits at the top of its "
                                               "range [0.05, 0.3]; fix: widen search.weight above 0.3")
