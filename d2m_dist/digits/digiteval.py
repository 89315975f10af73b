"""DigitEval: a GenEval-shaped compositional task on real handwritten digits, scored exactly.

A canvas is 16x16 RGB, four 8x8 slots (top-left, top-right, bottom-left,
bottom-right), each empty or holding one real scikit-learn digit, white or tinted
red, green or blue. Six categories, as GenEval's:

=================  =====================================  ====================================
category           caption                                every condition of the prompt
=================  =====================================  ====================================
single             "a seven"                              one digit, the rest empty
two                "a three and a seven"                  exactly those two digits
counting           "three fives"                          n slots, all that digit, the rest empty
colour             "a red three"                          one digit, of that colour
position           "a three left of a seven"              both, in that relation (same row or column)
colour_attribution "a red three and a blue seven"         each digit with its own colour
=================  =====================================  ====================================

The reader classifies each slot (a digit or empty) with an RBF SVM fitted on the
real digits' training split and reads a non-empty slot's colour from its channel
means; a category's score is the fraction of prompts whose every condition holds,
the overall score the mean over categories (GenEval's rule). Training
compositions draw from the training split, evaluation ones from the held-out
digits, so the reader is checked on digits it never saw.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from d2m_dist.digits.data import load_digits_arrays

CATEGORIES = ("single", "two", "counting", "colour", "position", "colour_attribution")
COLOURS = {"white": (1.0, 1.0, 1.0), "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PLURALS = ("zeros", "ones", "twos", "threes", "fours", "fives", "sixes", "sevens", "eights", "nines")
COUNTS = ("", "one", "two", "three", "four")
SLOTS = ((0, 0), (0, 1), (1, 0), (1, 1))  # (row, column) of the four 8x8 slots
SIDE = 16
RELATIONS = ("left of", "right of", "above", "below")
EMPTY = -1
HELD_OUT_FRACTION = 0.2
SPLIT_SEED = 0
INK = 40  # a slot whose brightest channel stays under this (0..255) everywhere reads as empty


@dataclass(frozen=True)
class Item:
    digit: int
    colour: str = "white"


@dataclass(frozen=True)
class Prompt:
    category: str
    caption: str
    items: Tuple[Item, ...]  # what must be on the canvas (a multiset), nothing else
    relation: Optional[str] = None  # position: items[0] <relation> items[1]
    colour_matters: bool = False


def _article(phrase: str) -> str:
    return "an" if phrase.split()[0] == "eight" else "a"  # "a one" (said "wun"), "an eight"; colours take "a"


def _one(item: Item, colour: bool) -> str:
    word = WORDS[item.digit] if not colour else f"{item.colour} {WORDS[item.digit]}"
    return f"{_article(word)} {word}"


TINTS = ("red", "green", "blue")


def draw_prompt(category: str, rng: np.random.Generator) -> Prompt:
    """One prompt of ``category`` drawn with ``rng`` (distinct digits where two appear)."""
    a, b = (int(x) for x in rng.choice(10, size=2, replace=False))
    if category == "single":
        return Prompt(category, _one(Item(a), False), (Item(a),))
    if category == "two":
        return Prompt(category, f"{_one(Item(a), False)} and {_one(Item(b), False)}", (Item(a), Item(b)))
    if category == "counting":
        n = int(rng.integers(1, 5))
        caption = _one(Item(a), False) if n == 1 else f"{COUNTS[n]} {PLURALS[a]}"
        return Prompt(category, caption, (Item(a),) * n)
    if category == "colour":
        item = Item(a, str(rng.choice(TINTS)))
        return Prompt(category, _one(item, True), (item,), colour_matters=True)
    if category == "position":
        rel = str(rng.choice(RELATIONS))
        return Prompt(category, f"{_one(Item(a), False)} {rel} {_one(Item(b), False)}", (Item(a), Item(b)),
                      relation=rel)
    if category == "colour_attribution":
        ca, cb = (str(c) for c in rng.choice(TINTS, size=2, replace=False))
        ia, ib = Item(a, ca), Item(b, cb)
        return Prompt(category, f"{_one(ia, True)} and {_one(ib, True)}", (ia, ib), colour_matters=True)
    raise ValueError(f"unknown DigitEval category {category!r}; one of {CATEGORIES}")


def make_prompts(per_category: int, seed: int = 0) -> List[Prompt]:
    """``per_category`` prompts of every category, drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    return [draw_prompt(category, rng) for category in CATEGORIES for _ in range(per_category)]


def all_captions() -> List[str]:
    """Every caption :func:`draw_prompt` can write, each once, in a fixed order (for encoding them once)."""
    out = []
    for a in range(10):
        out.append(_one(Item(a), False))
        out += [f"{COUNTS[n]} {PLURALS[a]}" for n in range(2, 5)]
        out += [_one(Item(a, t), True) for t in TINTS]
        for b in range(10):
            if b == a:
                continue
            out.append(f"{_one(Item(a), False)} and {_one(Item(b), False)}")
            out += [f"{_one(Item(a), False)} {rel} {_one(Item(b), False)}" for rel in RELATIONS]
            out += [f"{_one(Item(a, ta), True)} and {_one(Item(b, tb), True)}"
                    for ta in TINTS for tb in TINTS if ta != tb]
    return out


def _related(rel: str, first: Tuple[int, int], second: Tuple[int, int]) -> bool:
    (r1, c1), (r2, c2) = first, second
    return {"left of": r1 == r2 and c1 < c2, "right of": r1 == r2 and c1 > c2,
            "above": c1 == c2 and r1 < r2, "below": c1 == c2 and r1 > r2}[rel]


# ----------------------------------------------------------------------------- composing canvases


@dataclass(frozen=True)
class DigitPools:
    """Real digits by label: the training split (for teachers and the reader) and the held-out one."""

    train: Dict[int, np.ndarray]  # label -> uint8 [n, 8, 8]
    held_out: Dict[int, np.ndarray]


@functools.lru_cache(maxsize=1)
def digit_pools() -> DigitPools:
    from sklearn.model_selection import train_test_split  # lazy: scikit-learn's import takes a second

    images, labels = load_digits_arrays()
    idx = np.arange(len(labels))
    tr, te = train_test_split(idx, test_size=HELD_OUT_FRACTION, stratify=labels, random_state=SPLIT_SEED)
    return DigitPools({d: images[tr][labels[tr] == d] for d in range(10)},
                      {d: images[te][labels[te] == d] for d in range(10)})


def _slots_for(prompt: Prompt, rng: np.random.Generator) -> List[int]:
    if prompt.relation is None:
        return [int(s) for s in rng.permutation(4)[: len(prompt.items)]]
    pairs = [(i, j) for i in range(4) for j in range(4) if i != j and _related(prompt.relation, SLOTS[i], SLOTS[j])]
    return list(pairs[int(rng.integers(len(pairs)))])


def compose(prompt: Prompt, pool: Dict[int, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """A canvas meeting ``prompt`` (uint8 [16, 16, 3]) from real digits of ``pool``, in random allowed slots."""
    canvas = np.zeros((SIDE, SIDE, 3), dtype=np.float32)
    for item, slot in zip(prompt.items, _slots_for(prompt, rng)):
        digits = pool[item.digit]
        image = digits[int(rng.integers(len(digits)))].astype(np.float32)
        r, c = SLOTS[slot]
        canvas[8 * r: 8 * r + 8, 8 * c: 8 * c + 8] = image[:, :, None] * np.asarray(COLOURS[item.colour])
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- reading and scoring


@dataclass(frozen=True)
class SlotReading:
    digit: int  # EMPTY or 0..9
    colour: Optional[str]


class SlotReader:
    """Which digit (or none) each slot holds, and its colour."""

    def __init__(self, pools: Optional[DigitPools] = None):
        from sklearn.svm import SVC  # lazy: scikit-learn's import takes a second

        pools = pools or digit_pools()
        x = np.concatenate([pools.train[d] for d in range(10)]).reshape(-1, 64).astype(np.float32) / 255.0
        y = np.concatenate([np.full(len(pools.train[d]), d) for d in range(10)])
        self.svm = SVC(kernel="rbf", gamma="scale", C=10.0).fit(x, y)

    def read(self, canvas: np.ndarray) -> List[SlotReading]:
        out = []
        for r, c in SLOTS:
            patch = canvas[8 * r: 8 * r + 8, 8 * c: 8 * c + 8].astype(np.float32)
            grey = patch.max(axis=2)  # a tinted digit's ink lives in one channel: its brightest one
            if grey.max() < INK:
                out.append(SlotReading(EMPTY, None))
                continue
            digit = int(self.svm.predict((grey / 255.0).reshape(1, 64))[0])
            out.append(SlotReading(digit, _colour(patch, grey)))
        return out


def _colour(patch: np.ndarray, grey: np.ndarray) -> str:
    ink = grey >= INK
    means = patch[ink].mean(axis=0)
    top = means.max()
    if (means >= 0.6 * top).all():
        return "white"
    return ("red", "green", "blue")[int(np.argmax(means))]


def holds(prompt: Prompt, reading: Sequence[SlotReading]) -> bool:
    """Whether every condition of ``prompt`` holds on a canvas read as ``reading``."""
    present = [(i, s) for i, s in enumerate(reading) if s.digit != EMPTY]
    if len(present) != len(prompt.items):
        return False
    want = sorted((it.digit, it.colour if prompt.colour_matters else "") for it in prompt.items)
    got = sorted((s.digit, s.colour if prompt.colour_matters else "") for _, s in present)
    if want != got:
        return False
    if prompt.relation is None:
        return True
    a, b = prompt.items
    firsts = [i for i, s in present if s.digit == a.digit]
    seconds = [i for i, s in present if s.digit == b.digit]
    return any(_related(prompt.relation, SLOTS[i], SLOTS[j]) for i in firsts for j in seconds if i != j)


def score(prompts: Sequence[Prompt], canvases: Sequence[np.ndarray], reader: SlotReader) -> Dict[str, float]:
    """Per-category fraction of prompts whose canvas meets every condition, and ``overall`` (their mean)."""
    hits: Dict[str, List[bool]] = {c: [] for c in CATEGORIES}
    for prompt, canvas in zip(prompts, canvases):
        hits[prompt.category].append(holds(prompt, reader.read(canvas)))
    result = {c: float(np.mean(v)) for c, v in hits.items() if v}
    result["overall"] = float(np.mean([result[c] for c in CATEGORIES if c in result]))
    return result


# ----------------------------------------------------------------------------- prompt files


def prompt_to_json(prompt: Prompt) -> Dict:
    return {"category": prompt.category, "caption": prompt.caption,
            "items": [[it.digit, it.colour] for it in prompt.items], "relation": prompt.relation,
            "colour_matters": prompt.colour_matters}


def prompt_from_json(data: Dict) -> Prompt:
    """A prompt of a DigitEval prompt file; ValueError (one line) for anything that is not one."""
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    category = data.get("category")
    if category not in CATEGORIES:
        raise ValueError(f"category {category!r} is not one of {', '.join(CATEGORIES)}")
    caption = data.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError("no caption")
    items = data.get("items")
    if not isinstance(items, list) or not 1 <= len(items) <= len(SLOTS):
        raise ValueError(f"items must list 1..{len(SLOTS)} [digit, colour] pairs")
    parsed = []
    for item in items:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], int) and 0 <= item[0] <= 9
                and item[1] in COLOURS):
            raise ValueError(f"item {item!r} is not [digit 0..9, one of {', '.join(COLOURS)}]")
        parsed.append(Item(item[0], item[1]))
    relation = data.get("relation")
    if (relation is not None or category == "position") and (relation not in RELATIONS or len(parsed) != 2):
        raise ValueError(f"relation {relation!r}: position prompts need one of {', '.join(RELATIONS)} and two items")
    return Prompt(category, caption, tuple(parsed), relation, bool(data.get("colour_matters", False)))
