"""Scorers: right -> 1, wrong -> 0; ROUGE-1 against hand-computed cases."""
import pytest

from ctxjax.data import synthetic
from ctxjax.eval import scoring


@pytest.mark.parametrize("name,answers,right,wrong", [
    ("passkey", ["31337"], " 31337. Remember", " 3133 is the key 31337"),
    ("rouge1", [synthetic.FU_NEEDLE], " " + synthetic.FU_NEEDLE, " nothing here at all"),
    ("contains", [synthetic.FU_NEEDLE], " To eat a sandwich and sit in Dolores Park.",
     " sit in a park"),
    ("string_match_all", ["1234567", "7654321"], "7654321 and 1234567", "1111111"),
    ("string_match_part", ["1234567", "7654321"], "it is 7654321", "1111111"),
])
def test_right_scores_one_wrong_scores_zero(name, answers, right, wrong):
  fn = scoring.SCORERS.get(name)
  assert fn(right, answers) == 1.0
  assert fn(wrong, answers) == 0.0


def test_partial_string_matches():
  assert scoring.string_match_all("1234567 only", ["1234567", "7654321"]) == 0.5
  assert scoring.string_match_part("1234567 only", ["1234567", "7654321"]) == 1.0
  assert scoring.passkey_match("no digits", ["5"]) == 0.0


def test_rouge1_hand_cases():
  # target 6 tokens "the cat sat on the mat"; prediction "The cat, the dog!" -> tokens
  # the cat the dog: overlap the x2 (target has 2) + cat = 3; P = 3/4, R = 3/6.
  r = scoring.rouge1("the cat sat on the mat", "The cat, the dog!")
  assert r["precision"] == pytest.approx(0.75)
  assert r["recall"] == pytest.approx(0.5)
  assert r["fmeasure"] == pytest.approx(2 * 0.75 * 0.5 / 1.25)
  # clipping: "the the the" vs "the cat": overlap 1, P = 1/3, R = 1/2.
  r = scoring.rouge1("the cat", "the the the")
  assert (r["precision"], r["recall"]) == pytest.approx((1 / 3, 1 / 2))
  assert scoring.rouge1("a b", "")["fmeasure"] == 0.0
  assert scoring.rouge_tokens("San-Francisco's 2nd DAY") == ["san", "francisco", "s", "2nd",
                                                             "day"]


def test_task_score_and_unknown_task():
  out = scoring.score("needle", " " + synthetic.FU_NEEDLE, [synthetic.FU_NEEDLE])
  assert out["score"] == out["rouge1"] == 1.0 and out["rouge1_x10"] == 10.0
  assert out["contains"] == 1.0
  with pytest.raises(ValueError, match="valid choices"):
    scoring.score("pasky", "1", ["1"])
