"""
Tests for world/geneval_rules.py, the one rule engine behind both scorers: eval_geneval.py's
Mask2Former scorer and world/shapes.py's pixel oracle. Verdicts are compared with hand-worked answers.
(The engine's counting / exclude / colour / position basics are also exercised through
eval_geneval's names in test_eval.py.)
Run: python -m pytest -q test_geneval_rules.py
"""

import eval_geneval as E
from world import geneval_rules as R
from world import shapes as S


def det(cls, box, color=None, size=None, score=1.0):
    return R.Detection(cls, score, box, color=color, size=size)


def test_both_scorers_share_one_rule_engine():
    """eval_geneval re-exports the engine's own functions; shapes.oracle only calls the engine."""
    for name in (
        "Detection",
        "select_detections",
        "relative_position",
        "image_regions",
        "mean_area",
        "evaluate",
        "COLORS",
    ):
        assert getattr(E, name) is getattr(R, name), name
    src = open(S.__file__).read()
    assert (
        not hasattr(S, "relative_position")
        and "import eval_geneval" not in src
        and "from eval_geneval" not in src
    )


def test_position_rule_on_hand_computed_boxes():
    """relative_position matches hand-computed GenEval verdicts, incl. the no-relation margin."""
    b = (20, 20, 30, 30)  # reference box, centre (25, 25), 10x10
    assert R.relative_position((0, 20, 10, 30), b) == {"left of"}  # offset (-20, 0)
    assert R.relative_position((40, 21, 50, 31), b) == {"right of"}  # (20, 1): y revised to 0
    assert R.relative_position((20, 0, 30, 10), b) == {"above"}  # image y grows downward
    assert R.relative_position((20, 40, 30, 50), b) == {"below"}
    # diagonal (-20, -20): revised (-18, -18) / 28.28 = -0.64 on both axes -> both relations
    assert R.relative_position((0, 0, 10, 10), b) == {"left of", "above"}
    # steep (-10, +30): revised (-8, 28) / 31.62 = (-0.25, 0.89) -> only below
    assert R.relative_position((10, 50, 20, 60), b) == {"below"}
    # margin: offset (-1.5, 1) is within 0.1 * (10 + 10) = 2 on both axes -> no relation
    assert R.relative_position((18.5, 21, 28.5, 31), b) == set()


def test_colour_is_checked_on_the_top_count_detections_only():
    """GenEval names the colour of the best `count` detections of the class: a red circle ranked
    below a blue one does not satisfy 'a red circle' (an any-pair rule would accept it)."""
    meta = {
        "tag": "colors",
        "include": [{"class": "circle", "count": 1, "color": "red"}],
        "prompt": "p",
    }
    blue_first = {
        "circle": [det("circle", (0, 0, 9, 9), "blue"), det("circle", (20, 0, 29, 9), "red")]
    }
    red_first = {"circle": blue_first["circle"][::-1]}
    assert R.evaluate(meta, blue_first, (64, 64)) == (False, "expected red circle>=1, found 1 blue")
    assert R.evaluate(meta, red_first, (64, 64)) == (True, "")


def test_position_must_hold_for_every_top_detection_against_every_target():
    """'a square left of a circle' with two circles: the square must be left of both of them
    (GenEval compares against the whole target group), not just of one."""
    meta = {
        "tag": "position",
        "include": [
            {"class": "circle", "count": 1},
            {"class": "square", "count": 1, "position": ["left of", 0]},
        ],
        "prompt": "p",
    }
    square = det("square", (16, 16, 29, 29))  # centre (22.5, 22.5)
    right, left = det("circle", (33, 17, 46, 30)), det("circle", (1, 17, 14, 30))
    assert R.evaluate(meta, {"circle": [right], "square": [square]}, (64, 64))[0]
    # the target group is the top-1 circle only: a second, lower-ranked circle on the left is ignored
    assert R.evaluate(meta, {"circle": [right, left], "square": [square]}, (64, 64))[0]
    meta2 = dict(meta, include=[{"class": "circle", "count": 2}, meta["include"][1]])
    ok, reason = R.evaluate(meta2, {"circle": [right, left], "square": [square]}, (64, 64))
    assert not ok and reason == "expected square left of target, found right of"


def test_absolute_size_and_region_are_checked_per_top_detection():
    """The shapes world's small/large and GenEval++'s region hold for each of the top `count`."""
    meta = {
        "tag": "size",
        "include": [{"class": "star", "count": 1, "size": "small"}],
        "prompt": "p",
    }
    assert R.evaluate(meta, {"star": [det("star", (0, 0, 9, 9), size="small")]}, (64, 64))[0]
    assert R.evaluate(meta, {"star": [det("star", (0, 0, 13, 13), size="large")]}, (64, 64)) == (
        False,
        "expected small star>=1, found large",
    )
    meta = {
        "tag": "spatial_count_attr",
        "include": [{"class": "ring", "count": 2, "region": "left"}],
        "prompt": "p",
    }
    left2 = [det("ring", (0, 0, 9, 9)), det("ring", (0, 40, 9, 49))]
    assert R.evaluate(meta, {"ring": left2}, (64, 64))[0]
    assert not R.evaluate(meta, {"ring": [left2[0], det("ring", (40, 0, 49, 9))]}, (64, 64))[0]


def test_shapes_oracle_applies_the_engine_to_pixel_detections():
    """The pixel oracle's verdict on a render equals the engine's verdict on hand-written
    detections of the same objects (reading order = GenEval's best-first order)."""
    objs = [
        S.Obj("circle", "blue", "large", 0, 0),
        S.Obj("circle", "red", "small", 0, 3),
        S.Obj("heart", "pink", "small", 3, 3),
    ]
    image = S.render(objs)
    for color, want in (
        ("blue", True),
        ("red", False),
    ):  # only the first circle in reading order counts
        meta = {
            "tag": "colors",
            "include": [{"class": "circle", "count": 1, "color": color}],
            "prompt": "p",
        }
        hand = {
            "circle": [
                det("circle", (1, 1, 14, 14), "blue", "large"),
                det("circle", (51, 3, 60, 12), "red", "small"),
            ],
            "heart": [det("heart", (51, 51, 60, 60), "pink", "small")],
        }
        assert R.evaluate(meta, hand, (64, 64))[0] == want
        assert S.oracle(image, meta)[0] == want


def test_failures_split_wrong_images_into_a_missing_object_or_a_wrong_attribute():
    """experiments.failure_counts on the pixel oracle's verdicts for four renders of "a red circle and a blue
    square", each built to be right or wrong in a known way: right; square missing; square green; circle missing and
    square green. Wrong: 3; of them, an object missing: 2. lacks_an_object also reads the count rule's reason for
    multi-word classes and counts above one, and not the colour rule's."""
    from tools import experiments

    meta = S.make_line(
        "color_attr", [S.item("circle", color="red"), S.item("square", color="blue")]
    )
    circle, square, green = (
        S.Obj("circle", "red", "large", 0, 0),
        S.Obj("square", "blue", "large", 2, 2),
        S.Obj("square", "green", "large", 2, 2),
    )
    scenes = [
        ([circle, square], True, False),
        ([circle], False, True),
        ([circle, green], False, False),
        ([green], False, True),
    ]
    rows = []
    for objects, correct, missing in scenes:
        ok, reason = S.oracle(S.render(objects), meta)
        assert ok == correct and (not ok and R.lacks_an_object(reason)) == missing, reason
        rows.append({"tag": meta["tag"], "correct": ok, "reason": reason})
    assert experiments.failure_counts(rows) == {"color_attr": (4, 3, 2)}
    assert R.lacks_an_object(
        "expected traffic light>=3, found 2; expected red car>=1, found 1 blue"
    )
    assert not R.lacks_an_object("expected red traffic light>=1, found 1 green, 1 red")
