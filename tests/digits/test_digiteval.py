"""DigitEval's task: prompts, canvases of real digits, the slot reader, the scoring rule."""

import numpy as np

from d2m_dist.digits.digiteval import (
    CATEGORIES,
    EMPTY,
    Item,
    Prompt,
    SlotReader,
    SlotReading,
    compose,
    digit_pools,
    holds,
    make_prompts,
    score,
)


def test_prompts_cover_every_category_with_captions_from_their_content():
    prompts = make_prompts(5, seed=3)
    assert [p.category for p in prompts] == [c for c in CATEGORIES for _ in range(5)]
    assert make_prompts(5, seed=3) == prompts and make_prompts(5, seed=4) != prompts
    by = {p.category: p for p in prompts}
    assert by["single"].caption.split()[-1] in ("zero", "one", "two", "three", "four", "five", "six", "seven",
                                                "eight", "nine")
    a, b = by["colour_attribution"].items
    assert by["colour_attribution"].caption.endswith(f"{b.colour} {('zero one two three four five six seven eight nine').split()[b.digit]}")
    assert a.colour != b.colour and a.digit != b.digit
    assert all(1 <= len(p.items) <= 4 and len(set(i.digit for i in p.items)) == 1 for p in prompts
               if p.category == "counting")
    captions = " ".join(p.caption for p in make_prompts(30, seed=0))
    assert "an one" not in captions and "a eight" not in captions and "an eight" in captions


def _reading(*slots):
    """Four slots: None (empty) or (digit, colour)."""
    return [SlotReading(EMPTY, None) if s is None else SlotReading(s[0], s[1]) for s in slots]


def test_conditions_by_hand():
    left = Prompt("position", "a three left of a seven", (Item(3), Item(7)), relation="left of")
    assert holds(left, _reading((3, "white"), (7, "white"), None, None))
    assert holds(left, _reading(None, None, (3, "red"), (7, "white")))  # colour does not matter here
    assert not holds(left, _reading((7, "white"), (3, "white"), None, None))  # right of
    assert not holds(left, _reading((3, "white"), None, (7, "white"), None))  # above
    assert not holds(left, _reading((3, "white"), (7, "white"), (1, "white"), None))  # something extra
    attr = Prompt("colour_attribution", "a red three and a blue seven", (Item(3, "red"), Item(7, "blue")),
                  colour_matters=True)
    assert holds(attr, _reading(None, (7, "blue"), (3, "red"), None))
    assert not holds(attr, _reading(None, (7, "red"), (3, "blue"), None))  # colours swapped
    count = Prompt("counting", "three fives", (Item(5),) * 3)
    assert holds(count, _reading((5, "white"), None, (5, "green"), (5, "white")))
    assert not holds(count, _reading((5, "white"), None, (5, "white"), None))
    assert not holds(count, _reading((5, "white"), (6, "white"), (5, "white"), None))


def test_the_reader_reads_held_out_compositions_and_the_score_can_fall():
    pools = digit_pools()
    reader = SlotReader(pools)
    prompts = make_prompts(20, seed=0)
    rng = np.random.default_rng(0)
    canvases = [compose(p, pools.held_out, rng) for p in prompts]
    assert canvases[0].shape == (16, 16, 3) and canvases[0].dtype == np.uint8
    result = score(prompts, canvases, reader)
    assert result["overall"] >= 0.93 and min(result[c] for c in CATEGORIES) >= 0.85, result
    # the same canvases against other prompts, and empty canvases: the rule fails them
    shuffled = score(prompts, canvases[7:] + canvases[:7], reader)
    assert shuffled["overall"] < 0.3, shuffled
    assert score(prompts, [np.zeros_like(c) for c in canvases], reader)["overall"] == 0.0
