"""Tests for world/geneval_rules.py, the one rule engine behind both scorers: eval_geneval.py's
Mask2Former scorer and world/shapes.py's pixel oracle. Verdicts are compared with hand-worked
answers."""

import pytest

import eval_geneval as E
from standins import meta
from world import geneval_rules as R
from world import shapes as S


def det(cls, box, score=0.95, color=None, size=None):
    """A hand-made detection."""
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


def test_count_passes_only_with_enough_detections_of_the_class():
    """An include clause needs at least `count` detections of its class."""
    m = meta("counting", [{"class": "dog", "count": 2}])
    assert R.evaluate(m, {"dog": [det("dog", (0, 0, 1, 1))] * 2}, (64, 64))[0]
    ok, reason = R.evaluate(
        m, {"dog": [det("dog", (0, 0, 1, 1))], "cat": [det("cat", (0, 0, 1, 1))] * 3}, (64, 64)
    )
    assert not ok and reason == "expected dog>=2, found 1"


def test_exclude_fails_when_detected_number_reaches_its_count():
    """exclude {count: 3} fails at 3 detections and passes at 2 ('exactly two')."""
    m = meta("counting", [{"class": "dog", "count": 2}], [{"class": "dog", "count": 3}])
    assert R.evaluate(m, {"dog": [det("dog", (0, 0, 1, 1))] * 2}, (64, 64))[0]
    ok, reason = R.evaluate(m, {"dog": [det("dog", (0, 0, 1, 1))] * 3}, (64, 64))
    assert not ok and reason == "expected dog<3, found 3"


def test_select_detections_thresholds_caps_and_sorts():
    """Keep score > 0.3 (0.9 for 'counting'), best first, at most 16 per class, no NMS."""
    raw = [det("dog", (0, 0, 1, 1), s) for s in (0.2, 0.5, 0.95, 0.3)] + [
        det("cat", (0, 0, 1, 1), 0.1)
    ]
    assert [d.score for d in R.select_detections(raw, "two_object")["dog"]] == [0.95, 0.5]
    assert [d.score for d in R.select_detections(raw, "counting")["dog"]] == [0.95]
    assert "cat" not in R.select_detections(raw, "two_object")
    many = [det("dog", (0, 0, 1, 1), 0.99)] * 20  # identical boxes: nothing suppressed
    assert len(R.select_detections(many, "counting")["dog"]) == 16


@pytest.mark.parametrize(
    "box_a, relation",
    [
        ((0, 40, 10, 50), "left of"),
        ((90, 40, 100, 50), "right of"),
        ((40, 0, 50, 10), "above"),
        ((40, 90, 50, 100), "below"),
    ],
)
def test_relative_position_gives_each_relation(box_a, relation):
    """A box far to one side of B (centre 45,45) gets exactly that relation."""
    assert R.relative_position(box_a, (40, 40, 50, 50)) == {relation}


def test_relative_position_margin_cancels_small_offsets_and_keeps_diagonals():
    """Offsets inside the 0.1*(dimA+dimB) margin give no relation; a clear diagonal gives two."""
    # centres 3 px apart; margin = 0.1 * (10 + 10) = 2 per axis -> revised (1, 0), dx = 1/3 -> none
    assert R.relative_position((3, 0, 13, 10), (0, 0, 10, 10)) == set()
    assert R.relative_position((0, 0, 10, 10), (0, 0, 10, 10)) == set()
    # offset (-50, -50), margin 2: revised/|offset| = (-48, -48)/70.7 = -0.68 on both axes
    assert R.relative_position((0, 0, 10, 10), (50, 50, 60, 60)) == {"left of", "above"}


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


def test_position_rule_compares_to_the_target_group():
    """position ['right of', 0] holds when every object is right of every target object."""
    m = meta(
        "position",
        [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}],
    )
    cat, dog_r, dog_l = (
        det("cat", (0, 0, 10, 10)),
        det("dog", (80, 0, 90, 10)),
        det("dog", (0, 80, 10, 90)),
    )
    assert R.evaluate(m, {"cat": [cat], "dog": [dog_r]}, (100, 100)) == (True, "")
    assert R.evaluate(m, {"cat": [cat], "dog": [dog_l]}, (100, 100)) == (
        False,
        "expected dog right of target, found below",
    )
    assert (
        R.evaluate(m, {"dog": [dog_r]}, (100, 100))[1]
        == "expected cat>=1, found 0; no target for dog to be right of"
    )


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
    # the target group is the top-1 circle only: a second, lower-ranked circle on the left is
    # ignored
    assert R.evaluate(meta, {"circle": [right, left], "square": [square]}, (64, 64))[0]
    meta2 = dict(meta, include=[{"class": "circle", "count": 2}, meta["include"][1]])
    ok, reason = R.evaluate(meta2, {"circle": [right, left], "square": [square]}, (64, 64))
    assert not ok and reason == "expected square left of target, found right of"


def test_position_and_region_rules_read_only_the_count_best_detections():
    """As GenEval, a clause reads its class's `count` highest-scoring detections (best first): a
    weaker dog on the wrong side or in the wrong half, or a weaker extra cat as target, changes
    nothing; the best one decides."""
    m = meta(
        "position",
        [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}],
    )
    # the weak cat: right of the dog
    cat, cat_weak = (det("cat", (40, 40, 50, 50)), det("cat", (90, 40, 100, 50), 0.4))
    dog_right, dog_left = det("dog", (70, 40, 80, 50)), det("dog", (0, 40, 10, 50), 0.5)
    assert R.evaluate(m, {"cat": [cat, cat_weak], "dog": [dog_right, dog_left]}, (100, 100)) == (
        True,
        "",
    )
    best_left = det("dog", (0, 40, 10, 50), 0.99)
    assert not R.evaluate(m, {"cat": [cat], "dog": [best_left, dog_right]}, (100, 100))[0]
    r = meta("spatial_count_attr", [{"class": "dog", "count": 1, "region": "right"}])
    assert R.evaluate(r, {"dog": [dog_right, dog_left]}, (100, 100))[0]
    assert not R.evaluate(r, {"dog": [best_left, dog_right]}, (100, 100))[0]


def test_color_votes_need_count_crops_of_the_target_colour():
    """A count-2 red clause needs 2 of the top-2 crops to be red; only the top `count` are voted."""
    m = meta("color_count_attr", [{"class": "car", "count": 2, "color": "red"}])
    reds = [det("car", (0, 0, 1, 1), color="red")] * 2
    assert R.evaluate(m, {"car": reds + [det("car", (0, 0, 1, 1), 0.5, "blue")]}, (8, 8))[0]
    ok, reason = R.evaluate(m, {"car": [reds[0], det("car", (0, 0, 1, 1), color="blue")]}, (8, 8))
    assert not ok and reason == "expected red car>=2, found 1 red, 1 blue"
    called = []
    R.evaluate(
        m,
        {"car": reds},
        (8, 8),
        color_fn=lambda objs, cls: called.append(cls) or ["red"] * len(objs),
    )
    assert called == ["car"]


def test_colour_is_checked_on_the_top_count_detections_only():
    """GenEval names the colour of the best `count` detections of the class: a red circle ranked
    below a blue one does not satisfy 'a red circle' (an any-pair rule would accept it)."""
    meta = {
        "tag": "colors",
        "include": [{"class": "circle", "count": 1, "color": "red"}],
        "prompt": "p",
    }
    blue_first = {
        "circle": [
            det("circle", (0, 0, 9, 9), color="blue"),
            det("circle", (20, 0, 29, 9), color="red"),
        ]
    }
    red_first = {"circle": blue_first["circle"][::-1]}
    assert R.evaluate(meta, blue_first, (64, 64)) == (False, "expected red circle>=1, found 1 blue")
    assert R.evaluate(meta, red_first, (64, 64)) == (True, "")


def test_regions_use_box_centre_half_of_the_image():
    """GenEval++ region proxy: centre x < W/2 is left, y > H/2 is below, etc."""
    assert R.image_regions((0, 0, 20, 20), (100, 100)) == {"left", "above"}
    assert R.image_regions((60, 70, 100, 100), (100, 100)) == {"right", "below"}
    m = meta("spatial_count_attr", [{"class": "dog", "count": 2, "region": "left"}])
    assert R.evaluate(
        m, {"dog": [det("dog", (0, 0, 10, 10)), det("dog", (0, 50, 10, 60))]}, (100, 100)
    )[0]
    assert not R.evaluate(
        m, {"dog": [det("dog", (0, 0, 10, 10)), det("dog", (80, 0, 90, 10))]}, (100, 100)
    )[0]


def test_sizes_compare_box_areas_between_groups():
    """GenEval++ size proxy: the 'larger' group's mean box area must exceed the 'smaller' one's."""
    m = meta(
        "size_spatial_attr",
        [
            {"class": "bench", "count": 1, "size": "larger"},
            {"class": "spoon", "count": 1, "size": "smaller"},
        ],
    )
    big, small = (0, 0, 50, 50), (0, 0, 10, 10)
    assert R.evaluate(
        m, {"bench": [det("bench", big)], "spoon": [det("spoon", small)]}, (100, 100)
    )[0]
    ok, reason = R.evaluate(
        m, {"bench": [det("bench", small)], "spoon": [det("spoon", big)]}, (100, 100)
    )
    assert not ok and "expected bench larger" in reason and "expected spoon smaller" in reason


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
    # only the first circle in reading order counts
    for color, want in (("blue", True), ("red", False)):
        meta = {
            "tag": "colors",
            "include": [{"class": "circle", "count": 1, "color": color}],
            "prompt": "p",
        }
        hand = {
            "circle": [
                det("circle", (1, 1, 14, 14), color="blue", size="large"),
                det("circle", (51, 3, 60, 12), color="red", size="small"),
            ],
            "heart": [det("heart", (51, 51, 60, 60), color="pink", size="small")],
        }
        assert R.evaluate(meta, hand, (64, 64))[0] == want
        assert S.oracle(image, meta)[0] == want
