"""vtc-shapes: determinism, answers checked against the scene, dense labels against the pixels."""

from __future__ import annotations

import numpy as np
import pytest
from vtc.eval.benchmarks import create_benchmark, list_benchmarks
from vtc.eval.benchmarks import shapes as S


def test_registered_and_deterministic():
    assert "shapes" in list_benchmarks()
    a, b = S.make_scene(123), S.make_scene(123)
    assert np.array_equal(a.render(), b.render())
    assert not np.array_equal(a.render(), S.make_scene(124).render())
    b1, b2 = create_benchmark("shapes", per_type=3), create_benchmark("shapes", per_type=3)
    assert [(s.id, s.question, s.answer) for s in b1] == [(s.id, s.question, s.answer) for s in b2]
    assert np.array_equal(np.asarray(b1[0].images[0]), np.asarray(b2[0].images[0]))


def test_test_split_is_held_out_and_balanced():
    bench = create_benchmark("shapes", per_type=5)
    assert len(bench) == 5 * len(S.QTYPES)
    assert all(s.meta["seed"] >= S.TEST_SEED for s in bench)  # training uses seeds < TEST_SEED
    # any prefix covers the types in turn
    assert [s.qtype for s in bench.samples[: len(S.QTYPES)]] == list(S.QTYPES)
    val = create_benchmark("shapes", split="val", per_type=5)
    assert not {s.meta["seed"] for s in bench} & {s.meta["seed"] for s in val}


def _count(scene, word):
    return sum(word in (o.colour, o.shape, S.PLURAL[o.shape]) for o in scene.objects)


@pytest.mark.parametrize("seed", range(40))
def test_answers_follow_from_the_scene(seed):
    scene = S.make_scene(seed)
    rng = np.random.default_rng(seed)
    names = [o.name for o in scene.objects]
    for qtype in S.QTYPES:
        qa = S.ask(scene, qtype, rng)
        if qa is None:
            continue
        q, a = qa
        words = q.split()
        if qtype == "existence":
            name = " ".join(words[3:5])
            assert (name in names) == (a == "yes")
            if a == "no":  # adversarial: both attributes occur in the scene when possible
                c, s = words[3:5]
                both = any(o.colour == c for o in scene.objects) and any(o.shape == s for o in scene.objects)
                possible = any(
                    f"{c2} {s2}" not in names for c2 in {o.colour for o in scene.objects} for s2 in
                    {o.shape for o in scene.objects}
                )  # fmt: skip
                assert both or not possible
        elif qtype == "count":
            assert S.NUMBERS.index(a) == _count(scene, words[2])
        elif qtype == "colour":
            (obj,) = [o for o in scene.objects if o.shape == words[-2]]
            assert a == obj.colour
        elif qtype == "shape":
            (obj,) = [o for o in scene.objects if o.colour == words[-3]]
            assert a == obj.shape
        elif qtype == "spatial":
            first, second = " ".join(words[3:5]), " ".join(words[-3:-1])
            (oa,) = [o for o in scene.objects if o.name == first]
            (ob,) = [o for o in scene.objects if o.name == second]
            dx, dy = oa.cx - ob.cx, oa.cy - ob.cy
            want = ("left" if dx < 0 else "right") if abs(dx) > abs(dy) else ("above" if dy < 0 else "below")
            assert a == want
        elif qtype == "text":
            assert a == scene.letter


def test_label_maps_match_pixels():
    """Cells labelled with a colour are, on average, that colour; background cells are grey."""
    for seed in range(10):
        scene = S.make_scene(seed)
        img = scene.render().astype(float)
        lab = scene.label_maps(24)
        cells = img.reshape(24, 8, 24, 8, 3).mean((1, 3))  # [24, 24, 3]
        for ci, (name, rgb) in enumerate(S.COLOURS.items(), start=1):
            sel = lab["colour"] == ci
            if sel.any():
                mean = cells[sel].mean(0)
                assert np.abs(mean - np.array(rgb)).max() < 80, (name, mean)
        bg = (lab["colour"] == 0) & (lab["letter"] == 0)
        spread = cells[bg].max(-1) - cells[bg].min(-1)
        assert np.median(spread) < 25
        assert lab["centre"].sum() == len(scene.objects)
        assert (lab["letter"] > 0).any() == (scene.letter is not None)


def test_video_variant_temporal_answers():
    bench = create_benchmark("shapes", variant="video", per_type=4)
    assert {s.qtype for s in bench} == set(S.VIDEO_QTYPES)
    for s in bench:
        frames = s.images
        assert len(frames) == 4
        objs = s.scene.objects
        if s.qtype == "frame":
            name = " ".join(s.question.split()[-3:-1])
            (o,) = [o for o in objs if o.name == name]
            assert s.answer == S.ORDINALS[o.frame]
            # the object is drawn in that frame only
            diffs = [np.abs(np.asarray(f, float) - s.scene._background()).sum() for f in frames]
            assert int(np.argmax(diffs)) == o.frame or diffs[o.frame] > 0


def test_hires_variant_has_small_objects():
    scene = S.make_scene(5, "hires")
    assert scene.size == 384 and all(o.r < 12 for o in scene.objects)
    frac = sum(np.pi * o.r**2 for o in scene.objects) / scene.size**2
    assert frac < 0.1  # most tokens are background


def test_dense_variant_labels_every_letter_tag():
    """The pretraining variant: crowded scenes with 2-4 tags, each tag's cells labelled with its own letter and
    drawn dark on white; benchmark variants keep at most one tag (the one questions ask about)."""
    for seed in range(6):
        scene = S.make_scene(seed, "dense")
        assert len(scene.objects) >= 10 and 2 <= len(scene.tags()) <= 4
        assert scene.tags()[0] == (scene.letter, scene.letter_box)
        maps, img = scene.label_maps(24), scene.render()
        for ch, (x0, y0, x1, y1) in scene.tags():
            g0, g1 = (y0 + y1) // 2 * 24 // scene.size, (x0 + x1) // 2 * 24 // scene.size
            assert maps["letter"][g0, g1] == S.LETTERS.index(ch) + 1  # the tag's centre cell
            patch = img[y0 : y1 + 1, x0 : x1 + 1]
            assert (patch.mean(-1) < 60).any() and (patch.mean(-1) > 240).mean() > 0.5
        assert set(np.unique(maps["letter"])) == {0} | {S.LETTERS.index(ch) + 1 for ch, _ in scene.tags()}
    assert all(len(S.make_scene(seed).tags()) <= 1 for seed in range(20))


def test_bad_arguments():
    with pytest.raises(ValueError, match="variant"):
        S.make_scene(0, "huge")
    with pytest.raises(ValueError, match="split"):
        create_benchmark("shapes", split="train")
    with pytest.raises(ValueError, match="'dense'"):
        create_benchmark("shapes", variant="dense")
    with pytest.raises(ValueError, match="per_type"):
        create_benchmark("shapes", per_type=0)
