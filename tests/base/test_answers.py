"""core/base/answers.py: set and open-answer normalisation, token scores, judging, and the answer settings' checks."""

from __future__ import annotations

import numpy as np
import pytest

from dxrag.core.base.answers import (AnswerSettings, judge, normalize_open, normalize_set, parse_set, set_members,
                                    token_scores)
from task_fixtures import rewrite_set


def test_set_normalisation():
    assert normalize_set("b, a") == normalize_set("a, b") == normalize_set(" A ,, B,a ") == "a, b"
    assert parse_set("none") == parse_set(" None ") == parse_set("") == ()
    assert normalize_set("NONE") == "none" and set_members("none") == ()
    assert parse_set("none, effusion") == ("effusion",)  # the empty-set token is not a label
    assert normalize_set("absent", empty_set="Absent") == "absent"
    assert parse_set("none", empty_set="absent") == ("none",)
    assert set_members(normalize_set("mass, effusion")) == ("effusion", "mass")


def test_open_normalisation_and_token_scores():
    assert normalize_open("The left lung.") == normalize_open("left lung") == "left lung"
    assert normalize_open("  An X-ray,  of THE chest! ") == "xray of chest"
    assert normalize_open("«yes»") == "yes"  # Unicode punctuation too
    # pred {left, lower, lobe} vs gold {left, lobe}: overlap 2, P = 2/3, R = 1, F1 = 2PR/(P+R) = 0.8
    assert token_scores("left lower lobe", "left lobe") == pytest.approx((1.0, 0.8))
    # multiset overlap: "no no" vs "no" overlaps once: P = 1/2, R = 1, F1 = 2/3
    assert token_scores("no no", "no") == pytest.approx((1.0, 2 / 3))
    assert token_scores("effusion", "pleural effusion") == pytest.approx((0.5, 2 / 3))
    assert token_scores("", "") == (1.0, 1.0) and token_scores("x", "") == (0.0, 0.0)
    assert judge("effusion", "pleural effusion", "open") is False
    assert judge("large pleural effusion", "pleural effusion", "open", AnswerSettings(open_correct="recall"))
    assert not judge("effusion", "pleural effusion", "open", AnswerSettings(open_correct="f1", open_threshold=0.7))
    assert judge("effusion", "pleural effusion", "open", AnswerSettings(open_correct="f1", open_threshold=0.6))
    assert judge("a, b", "a, b", "set") and not judge("The left lung", "left lung", "closed")


def test_set_canonical_form_ignores_order_case_spacing_duplicates():
    rng = np.random.default_rng(7)
    labels = ["atelectasis", "effusion", "mass", "nodule"]
    for _ in range(200):
        members = [x for x in labels if rng.random() < 0.5]
        want = ", ".join(sorted(members)) if members else "none"
        assert normalize_set(rewrite_set(members, rng)) == want


def test_settings_are_checked():
    assert AnswerSettings().problems() == []
    assert len(AnswerSettings(task="multi", empty_set=" ", open_correct="bleu", open_threshold=0).problems()) == 4
