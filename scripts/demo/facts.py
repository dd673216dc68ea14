"""The small world of facts the demo knows: opposites, synonyms, colours, animals, arithmetic.

The same facts feed the pretraining corpus (as plain sentences), the MMLU-style multiple-choice sets and the
benign chat requests, so that what the evaluation asks about is something the base model could have learned.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path

OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"), ("open", "closed"),
    ("wet", "dry"), ("old", "young"), ("tall", "short"), ("full", "empty"), ("hard", "soft"), ("early", "late"),
    ("loud", "quiet"), ("rich", "poor"), ("strong", "weak"), ("clean", "dirty"), ("thick", "thin"), ("in", "out"),
    ("left", "right"), ("win", "lose"), ("push", "pull"), ("day", "night"), ("first", "last"), ("buy", "sell"),
    ("true", "false"), ("high", "low"), ("near", "far"), ("inside", "outside"), ("sweet", "sour"),
    ("asleep", "awake"), ("friend", "enemy"), ("always", "never"), ("top", "bottom"), ("give", "take"),
    ("laugh", "cry"), ("arrive", "leave"), ("north", "south"), ("east", "west"), ("wide", "narrow"),
    ("deep", "shallow"), ("smooth", "rough"), ("cheap", "expensive"), ("easy", "difficult"), ("safe", "dangerous"),
    ("love", "hate"), ("remember", "forget"), ("heavy", "light"), ("black", "white"),
]  # fmt: skip
SYNONYMS = [
    ("big", "large"), ("small", "little"), ("happy", "glad"), ("fast", "quick"), ("begin", "start"),
    ("end", "finish"), ("smart", "clever"), ("angry", "mad"), ("tired", "sleepy"), ("shut", "close"),
    ("rich", "wealthy"), ("sick", "ill"), ("quiet", "silent"), ("easy", "simple"), ("shout", "yell"),
    ("gift", "present"), ("jump", "leap"), ("scared", "afraid"), ("pretty", "beautiful"), ("talk", "speak"),
    ("hard", "difficult"), ("kind", "nice"), ("story", "tale"), ("rock", "stone"), ("road", "street"),
]  # fmt: skip
COLORS = {
    "banana": "yellow", "lemon": "yellow", "school bus": "yellow", "corn cob": "yellow", "sunflower": "yellow",
    "strawberry": "red", "tomato": "red", "cherry": "red", "fire truck": "red", "ladybug": "red",
    "leaf": "green", "frog": "green", "lime": "green", "cucumber": "green", "pea": "green",
    "clear sky": "blue", "blueberry": "blue", "sapphire": "blue", "bluebird": "blue",
    "snowball": "white", "cloud": "white", "polar bear": "white", "glass of milk": "white", "swan": "white",
    "crow": "black", "lump of coal": "black", "panther": "black", "tire": "black",
    "carrot": "orange", "pumpkin": "orange", "tangerine": "orange", "goldfish": "orange",
    "grape": "purple", "plum": "purple", "eggplant": "purple", "violet": "purple",
    "flamingo": "pink", "pig": "pink", "chocolate bar": "brown", "tree trunk": "brown", "coconut": "brown",
}  # fmt: skip
# name: (legs, sound, baby, kind); None where the animal has no well-known one.
ANIMALS = {
    "dog": (4, "woof", "puppy", "mammal"), "cat": (4, "meow", "kitten", "mammal"), "cow": (4, "moo", "calf", "mammal"),
    "sheep": (4, "baa", "lamb", "mammal"), "horse": (4, "neigh", "foal", "mammal"), "pig": (4, "oink", "piglet", "mammal"),
    "duck": (2, "quack", "duckling", "bird"), "hen": (2, "cluck", "chick", "bird"), "owl": (2, "hoot", "owlet", "bird"),
    "lion": (4, "roar", "cub", "mammal"), "bear": (4, "growl", "cub", "mammal"), "frog": (4, "croak", "tadpole", "amphibian"),
    "snake": (0, "hiss", "hatchling", "reptile"), "spider": (8, None, "spiderling", "arachnid"),
    "ant": (6, None, "larva", "insect"), "bee": (6, "buzz", "larva", "insect"), "goat": (4, "bleat", "kid", "mammal"),
    "mouse": (4, "squeak", "pup", "mammal"), "wolf": (4, "howl", "pup", "mammal"), "donkey": (4, "hee-haw", "foal", "mammal"),
    "goldfish": (0, None, "fry", "fish"), "butterfly": (6, None, "caterpillar", "insect"), "kangaroo": (2, None, "joey", "mammal"),
    "penguin": (2, None, "chick", "bird"), "deer": (4, None, "fawn", "mammal"), "goose": (2, "honk", "gosling", "bird"),
    "eagle": (2, "screech", "eaglet", "bird"), "turkey": (2, "gobble", "poult", "bird"), "crow": (2, "caw", None, "bird"),
    "elephant": (4, "trumpet", "calf", "mammal"), "lizard": (4, None, "hatchling", "reptile"), "beetle": (6, None, "grub", "insect"),
    "turtle": (4, None, "hatchling", "reptile"), "shark": (0, None, "pup", "fish"),
}  # fmt: skip
MMLU_SUBJECTS = ("arithmetic", "opposites", "animal_facts", "colors")
LETTERS = "ABCD"


def article(noun: str) -> str:
    return "an" if noun[0] in "aeiou" else "a"


def a(noun: str) -> str:
    return f"{article(noun)} {noun}"


@dataclass(frozen=True)
class FactQuestion:
    """One question with its right answer and the pool its distractors come from."""

    subject: str
    question: str
    answer: str
    pool: tuple[str, ...]


def fact_questions() -> dict[str, list[FactQuestion]]:
    """Every multiple-choice question the facts allow, per MMLU subject, in a fixed order."""
    kinds = sorted({kind for *_, kind in ANIMALS.values()})
    sounds = tuple(sorted({s for _, s, _, _ in ANIMALS.values() if s}))
    babies = tuple(sorted({b for _, _, b, _ in ANIMALS.values() if b}))
    colors = tuple(sorted(set(COLORS.values())))
    words = tuple(sorted({w for pair in OPPOSITES for w in pair}))
    out: dict[str, list[FactQuestion]] = {s: [] for s in MMLU_SUBJECTS}
    for x, y in OPPOSITES:
        out["opposites"].append(FactQuestion("opposites", f"What is the opposite of '{x}'?", y, words))
        out["opposites"].append(FactQuestion("opposites", f"What is the opposite of '{y}'?", x, words))
    for thing, color in COLORS.items():
        out["colors"].append(FactQuestion("colors", f"What color is {a(thing)}?", color, colors))
    for color in colors:  # the reverse direction, once per colour so that no question text repeats
        thing = next(t for t, c in COLORS.items() if c == color)
        others = tuple(t for t, c in COLORS.items() if c != color)
        out["colors"].append(FactQuestion("colors", f"Which of these is usually {color}?", thing, others))
    for animal, (legs, sound, baby, kind) in ANIMALS.items():
        out["animal_facts"].append(
            FactQuestion("animal_facts", f"How many legs does {a(animal)} have?", str(legs), ("0", "2", "4", "6", "8"))
        )
        out["animal_facts"].append(
            FactQuestion("animal_facts", f"What kind of animal is {a(animal)}?", kind, tuple(kinds))
        )
        if sound:
            out["animal_facts"].append(
                FactQuestion("animal_facts", f"What sound does {a(animal)} make?", sound, sounds)
            )
        if baby:
            out["animal_facts"].append(FactQuestion("animal_facts", f"What is a baby {animal} called?", baby, babies))
    for x in range(2, 13):
        for y in range(2, 10):
            out["arithmetic"].append(FactQuestion("arithmetic", f"What is {x} + {y}?", str(x + y), ()))
            out["arithmetic"].append(FactQuestion("arithmetic", f"What is {x} * {y}?", str(x * y), ()))
    return out


def fact_sentences() -> list[str]:
    """The facts as plain sentences for the pretraining corpus."""
    lines = []
    for x, y in OPPOSITES:
        lines += [
            f"The opposite of '{x}' is '{y}'.",
            f"The opposite of '{y}' is '{x}'.",
            f"'{x.capitalize()}' and '{y}' are opposites.",
        ]
    for x, y in SYNONYMS:
        lines += [f"Another word for '{x}' is '{y}'.", f"'{x.capitalize()}' and '{y}' mean the same thing."]
    for thing, color in COLORS.items():
        lines += [f"{a(thing).capitalize()} is {color}.", f"The color of {a(thing)} is {color}."]
    for animal, (legs, sound, baby, kind) in ANIMALS.items():
        lines += [f"{a(animal).capitalize()} has {legs} legs.", f"{a(animal).capitalize()} is {a(kind)}."]
        if sound:
            lines.append(f"{a(animal).capitalize()} says '{sound}'.")
        if baby:
            lines.append(f"A baby {animal} is called {a(baby)}.")
    for x in range(0, 13):
        for y in range(0, 13):
            lines += [f"{x} + {y} = {x + y}.", f"{x} * {y} = {x * y}."]
    return lines


def _distractors(rng: random.Random, fq: FactQuestion) -> list[str]:
    if fq.subject == "arithmetic":
        value = int(fq.answer)
        candidates = sorted({value + d for d in (-3, -2, -1, 1, 2, 3, 10) if value + d >= 0})
        return rng.sample([str(c) for c in candidates], 3)
    return rng.sample([p for p in fq.pool if p != fq.answer], 3)


def mc_row(rng: random.Random, fq: FactQuestion, letter: str) -> list[str]:
    """[question, A, B, C, D, answer letter] with the right answer at `letter`."""
    options = _distractors(rng, fq)
    options.insert(LETTERS.index(letter), fq.answer)
    return [fq.question, *options, letter]


def balanced_letters(rng: random.Random, n: int) -> list[str]:
    letters = [LETTERS[i % 4] for i in range(n)]
    rng.shuffle(letters)
    return letters


Rows = list[list[str]]


def build_mmlu(
    rng: random.Random, n_test: int = 60
) -> tuple[dict[str, Rows], dict[str, Rows], list[tuple[str, list[str]]]]:
    """(dev rows, test rows) per subject, and (subject, row) practice rows: the questions left over, for pretraining."""
    dev: dict[str, Rows] = {}
    test: dict[str, Rows] = {}
    practice: list[tuple[str, list[str]]] = []
    for subject, questions in fact_questions().items():
        questions = list(questions)
        rng.shuffle(questions)
        n = min(n_test, len(questions) - 5)
        test_letters, dev_letters = balanced_letters(rng, n), balanced_letters(rng, 5)
        test[subject] = [mc_row(rng, fq, letter) for fq, letter in zip(questions[:n], test_letters)]
        dev[subject] = [mc_row(rng, fq, letter) for fq, letter in zip(questions[n : n + 5], dev_letters)]
        rest = questions[n + 5 :]
        practice += [(subject, mc_row(rng, fq, letter)) for fq, letter in zip(rest, balanced_letters(rng, len(rest)))]
    return dev, test, practice


def mc_prompt(row: list[str], subject: str) -> str:
    """The hendrycks MMLU rendering of one row, with its answer (used for practice text in the corpus)."""
    question, *options, answer = row
    body = "\n".join(f"{letter}. {option}" for letter, option in zip(LETTERS, options))
    topic = subject.replace("_", " ")
    return f"The following are multiple choice questions (with answers) about {topic}.\n\n{question}\n{body}\nAnswer: {answer}"


def write_csv(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle, lineterminator="\n").writerows(rows)
