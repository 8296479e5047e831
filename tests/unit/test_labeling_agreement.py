"""Agreement values checked by hand."""

import math

import pandas as pd
import pytest

from unifl.data.preferences import VOTE_COLUMNS
from unifl.labeling.agreement import agreement_report, krippendorff_alpha_nominal


def votes_frame(rows: list[tuple[str, str, str, str]]) -> pd.DataFrame:
    """rows of (task, annotator, dimension, choice)."""
    return pd.DataFrame(
        [
            {
                "task_id": t,
                "annotation_id": f"{t}-{a}",
                "annotator": a,
                "prompt": "p",
                "image_a": "a.png",
                "image_b": "b.png",
                "dimension": d,
                "choice": c,
            }
            for t, a, d, c in rows
        ],
        columns=list(VOTE_COLUMNS),
    )


def test_alpha_small_example_by_hand():
    # Units (tasks) and their votes:
    #   u1: A A A    u2: A B    u3: B B Tie    u4: Tie (one vote: not pairable)
    # Disagreeing ordered pairs per unit, divided by (m_u - 1):
    #   u1: 9 - 9 = 0        u2: (4 - 2) / 1 = 2     u3: (9 - (4 + 1)) / 2 = 2   -> D_o sum 4
    # Pairable value totals: n_A = 3 + 1 = 4, n_B = 1 + 2 = 3, n_Tie = 1, n = 8
    #   expected disagreement sum: n^2 - (16 + 9 + 1) = 64 - 26 = 38
    # alpha = 1 - (n - 1) * 4 / 38 = 1 - 28 / 38 = 10 / 38
    units = [["A", "A", "A"], ["A", "B"], ["B", "B", "Tie"], ["Tie"]]
    assert krippendorff_alpha_nominal(units) == pytest.approx(10 / 38)


def test_alpha_reference_example():
    # Krippendorff (2011), "Computing Krippendorff's alpha-reliability", nominal
    # example with 4 coders, 12 units and missing values: alpha = 0.743.
    coders = [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
        [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
    ]
    units = [[c[i] for c in coders if c[i] is not None] for i in range(12)]
    assert krippendorff_alpha_nominal(units) == pytest.approx(0.743, abs=5e-4)


def test_alpha_limits():
    assert krippendorff_alpha_nominal([["A", "A"], ["B", "B"], ["Tie", "Tie"]]) == 1.0
    # One category only: expected disagreement is zero, alpha undefined.
    assert math.isnan(krippendorff_alpha_nominal([["A", "A"], ["A", "A", "A"]]))
    assert math.isnan(krippendorff_alpha_nominal([["A"], ["B"]]))
    # Systematic disagreement goes below zero: u1 A B, u2 A B.
    # D_o sum = 2 + 2 = 4; n_A = n_B = 2, n = 4; expected sum = 16 - 8 = 8;
    # alpha = 1 - 3 * 4 / 8 = -0.5
    assert krippendorff_alpha_nominal([["A", "B"], ["A", "B"]]) == pytest.approx(-0.5)


def test_report_per_dimension_and_leave_one_out_by_hand():
    rows = [
        # color, task 1: annotators 1, 2, 3 say A, A, B
        ("1", "1", "color", "A"),
        ("1", "2", "color", "A"),
        ("1", "3", "color", "B"),
        # color, task 2: A, A, A
        ("2", "1", "color", "A"),
        ("2", "2", "color", "A"),
        ("2", "3", "color", "A"),
        # detail, task 1: A, B (annotator 3 abstained)
        ("1", "1", "detail", "A"),
        ("1", "2", "detail", "B"),
    ]
    report = agreement_report(votes_frame(rows))
    color = report["dimensions"]["color"]
    # color units: [A A B], [A A A]. D_o sum: (9 - 5) / 2 = 2; n_A = 5, n_B = 1, n = 6;
    # expected sum = 36 - 26 = 10; alpha = 1 - 5 * 2 / 10 = 0.0
    assert color["alpha"] == pytest.approx(0.0)
    assert color["pairable_tasks"] == 2 and color["votes"] == 6
    assert report["dimensions"]["lighting"]["alpha"] is None
    # detail: one unit A B; n_A = n_B = 1, n = 2: D_o sum 2, expected 4 - 2 = 2;
    # alpha = 1 - 1 * 2 / 2 = 0.0
    assert report["dimensions"]["detail"]["alpha"] == pytest.approx(0.0)

    annotators = report["annotators"]
    # Annotator 1: color t1 others {A, B} split -> undecided; color t2 others A A -> agrees;
    #              detail t1 others {B} -> disagrees.  1 of 2.
    assert annotators["1"]["compared"] == 2 and annotators["1"]["undecided"] == 1
    assert annotators["1"]["agreement"] == pytest.approx(0.5)
    assert annotators["1"]["by_dimension"] == {"color": 1.0, "detail": 0.0}
    # Annotator 3: color t1 others A A -> B disagrees; t2 agrees. 1 of 2.
    assert annotators["3"]["agreement"] == pytest.approx(0.5)
    assert annotators["3"]["by_dimension"] == {"color": 0.5}
    assert list(annotators) == ["1", "2", "3"]


def test_report_of_no_votes():
    report = agreement_report(votes_frame([]))
    assert all(v["alpha"] is None for v in report["dimensions"].values())
    assert report["annotators"] == {}
