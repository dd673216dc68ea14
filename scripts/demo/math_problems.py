"""Grade-school arithmetic word problems in GSM8K layout, generated from templates.

A problem keeps its arithmetic as steps over named values, so a solution can be rendered correctly, reworded,
or with one wrong intermediate result that propagates to the final `#### N` (for preference pairs).
Calculator annotations (`<<a+b=c>>`) are left out on purpose: they double the length of a solution, and on
2 CPU cores shorter sequences are what lets the base model learn arithmetic at all.
Every number, given or computed, stays within 1-20 (products of 2-5 by 2-4): the levels differ in the number of
steps, not in the size of the numbers. With operands up to 50 (the first version) the 0.8M-parameter model got only
about 15% of its equations right after pretraining, too few correct samples for RL to reinforce; with numbers up
to 20 (~390 distinct facts) it gets most of them right.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

NAMES = [
    ("Tom", "He"), ("Lily", "She"), ("Sam", "He"), ("Mia", "She"), ("Ben", "He"), ("Emma", "She"),
    ("Leo", "He"), ("Ava", "She"), ("Max", "He"), ("Zoe", "She"), ("Jack", "He"), ("Nora", "She"),
    ("Omar", "He"), ("Lucy", "She"), ("Ravi", "He"), ("Anna", "She"), ("Carlos", "He"), ("Grace", "She"),
    ("Ivan", "He"), ("Maya", "She"), ("Noah", "He"), ("Ella", "She"), ("Kai", "He"), ("Rosa", "She"),
]  # fmt: skip
OBJECTS = [
    "apples", "pencils", "stickers", "marbles", "cookies", "books", "cards", "shells", "balloons", "crayons",
    "stamps", "coins", "eggs", "oranges", "toy cars", "beads", "flowers", "rocks", "candies", "buttons",
]  # fmt: skip
CONTAINERS = [("bag", "bags"), ("box", "boxes"), ("pack", "packs"), ("jar", "jars"), ("basket", "baskets")]
GAIN_VERBS = ["buys", "finds", "gets", "wins", "collects"]
LOSE_VERBS = ["gives away", "loses", "sells", "donates"]
LEVELS = (1, 2, 3)
ANSWER_RE = re.compile(r"####\s*(-?[\d,]+)")


@dataclass(frozen=True)
class Step:
    """`out = left op right`, written as `line` (and as `variant`, a rewording with the same content)."""

    left: str
    op: str
    right: str
    out: str
    line: str
    variant: str


@dataclass
class MathProblem:
    question: str
    values: dict[str, int]  # the numbers given in the question
    steps: list[Step]
    words: dict[str, str] = field(default_factory=dict)  # names and objects the solution lines mention
    level: int = 1

    def evaluate(self, wrong_step: int | None = None, delta: int = 0) -> dict[str, int]:
        env = dict(self.values)
        for i, step in enumerate(self.steps):
            env[step.out] = apply(step.op, env[step.left], env[step.right]) + (delta if i == wrong_step else 0)
        return env

    @property
    def result(self) -> int:
        return self.evaluate()[self.steps[-1].out]

    def solution(
        self, wrong_step: int | None = None, delta: int = 0, reworded: bool = False, final_line: bool = True
    ) -> str:
        """The worked solution; `wrong_step`/`delta` make one intermediate result wrong and carry it forward."""
        env = self.evaluate(wrong_step, delta)
        lines = []
        for step in self.steps:
            expr = f"{env[step.left]} {step.op} {env[step.right]}"
            template = step.variant if reworded else step.line
            lines.append(template.format(expr=expr, value=env[step.out], **self.words))
        if final_line:
            lines.append(f"#### {env[self.steps[-1].out]}")
        return "\n".join(lines)

    def record(self) -> dict:
        return {"question": self.question, "answer": self.solution(), "level": self.level}


def apply(op: str, left: int, right: int) -> int:
    return {"+": left + right, "-": left - right, "*": left * right}[op]


def arithmetic_facts() -> list[str]:
    """Every equation the problems can need, as `a op b = c` lines: sums and differences within 1-20, products of
    2-5 by 2-4 in both orders (395 facts). Pretraining text has such tables; here they make the base model learn its
    arithmetic by the same step for any seed (see scripts/demo/model.py, PretrainSettings)."""
    facts = [f"{a} + {b} = {a + b}" for a in range(1, 20) for b in range(1, 21 - a)]
    facts += [f"{a} - {b} = {a - b}" for a in range(2, 21) for b in range(1, a)]
    facts += [f"{a} * {b} = {a * b}" for a in range(2, 6) for b in range(2, 5)]
    facts += [f"{b} * {a} = {a * b}" for a in range(2, 6) for b in range(2, 5)]
    return list(dict.fromkeys(facts))  # 2 * 2 etc. only once


def final_answer(solution: str) -> int | None:
    """The number after the last `####`, or None when there is none."""
    found = ANSWER_RE.findall(solution)
    return int(found[-1].replace(",", "")) if found else None


def _people(rng: random.Random) -> dict[str, str]:
    (name, pronoun), (friend, _), (friend2, _) = rng.sample(NAMES, 3)
    singular, plural = rng.choice(CONTAINERS)
    return {
        "name": name,
        "he": pronoun,
        "friend": friend,
        "friend2": friend2,
        "obj": rng.choice(OBJECTS),
        "gain": rng.choice(GAIN_VERBS),
        "lose": rng.choice(LOSE_VERBS),
        "box": singular,
        "boxes": plural,
    }


# Wordings of a solution line: (the line the data uses, a rewording with the same content).
HAS_NOW = ("{name} has {expr} = {value} {obj} now.", "Now {name} has {expr} = {value} {obj}.")
NOW_HAS = ("Now {name} has {expr} = {value} {obj}.", "{name} has {expr} = {value} {obj} now.")
LEFT = ("{name} has {expr} = {value} {obj} left.", "There are {expr} = {value} {obj} left.")
IN_TOTAL = ("They have {expr} = {value} {obj} in total.", "In total they have {expr} = {value} {obj}.")
TOGETHER = ("Together they have {expr} = {value} {obj}.", "They have {expr} = {value} {obj} together.")
FRIEND_HAS = ("{friend} has {expr} = {value} {obj}.", "So {friend} has {expr} = {value} {obj}.")
FIRST = ("First {name} has {expr} = {value} {obj}.", "At first {name} has {expr} = {value} {obj}.")
THEN = ("Then {name} has {expr} = {value} {obj}.", "After that {name} has {expr} = {value} {obj}.")
AT_THE_END = ("At the end {name} has {expr} = {value} {obj}.", "Finally {name} has {expr} = {value} {obj}.")
MONDAY = ("After Monday {name} has {expr} = {value} {obj}.", "On Monday {name} keeps {expr} = {value} {obj}.")
TUESDAY = ("After Tuesday {name} has {expr} = {value} {obj}.", "On Tuesday {name} keeps {expr} = {value} {obj}.")
PAIR_HAS = (
    "{name} and {friend} have {expr} = {value} {obj}.",
    "Together {name} and {friend} have {expr} = {value} {obj}.",
)
ALL_THREE = ("All three have {expr} = {value} {obj}.", "Altogether they have {expr} = {value} {obj}.")
BUYS = ("{name} buys {expr} = {value} {obj}.", "The {boxes} hold {expr} = {value} {obj}.")
BOXES_HAVE = ("The {boxes} have {expr} = {value} {obj}.", "{name} buys {expr} = {value} {obj}.")


def _step(spec: str, wording: tuple[str, str]) -> Step:
    """`_step("a+b=x", ...)`: x = a + b, values named by single letters."""
    return Step(spec[0], spec[1], spec[2], spec[4], *wording)


def _level1(rng: random.Random) -> MathProblem:
    """One operation, numbers up to 20."""
    w, kind = _people(rng), rng.randrange(4)
    if kind in (0, 2):  # a sum
        a = rng.randint(2, 18)
        b = rng.randint(1, 20 - a)
    else:  # a difference
        a = rng.randint(3, 20)
        b = rng.randint(1, a - 1)
    question, step = [
        ("{name} has {a} {obj}. {he} {gain} {b} more. How many {obj} does {name} have now?", _step("a+b=x", HAS_NOW)),
        ("{name} has {a} {obj}. {he} {lose} {b} of them. How many {obj} are left?", _step("a-b=x", LEFT)),
        ("{name} has {a} {obj} and {friend} has {b} {obj}. How many {obj} do they have in total?", _step("a+b=x", IN_TOTAL)),
        ("{name} has {a} {obj}. {friend} has {b} fewer {obj} than {name}. How many {obj} does {friend} have?", _step("a-b=x", FRIEND_HAS)),
    ][kind]  # fmt: skip
    return MathProblem(question.format(a=a, b=b, **w), {"a": a, "b": b}, [step], w, level=1)


def _level2(rng: random.Random) -> MathProblem:
    """Two operations, numbers up to 20."""
    w, kind = _people(rng), rng.randrange(4)
    if kind == 0:  # a + b - c
        a = rng.randint(2, 18)
        b = rng.randint(1, 20 - a)
        c = rng.randint(1, a + b - 1)
    elif kind == 1:  # a + (a + b)
        a = rng.randint(2, 9)
        b = rng.randint(1, 20 - 2 * a)
        c = 0
    elif kind == 2:  # a - b - c
        a = rng.randint(4, 20)
        b = rng.randint(1, a - 2)
        c = rng.randint(1, a - b - 1)
    else:  # a + b + c
        a = rng.randint(2, 16)
        b = rng.randint(1, 19 - a)
        c = rng.randint(1, 20 - a - b)
    question, steps = [
        ("{name} has {a} {obj}. {he} {gain} {b} more and then {lose} {c}. How many {obj} does {name} have now?", [_step("a+b=x", FIRST), _step("x-c=y", THEN)]),
        ("{name} has {a} {obj}. {friend} has {b} more {obj} than {name}. How many {obj} do they have together?", [_step("a+b=x", FRIEND_HAS), _step("a+x=y", TOGETHER)]),
        ("{name} has {a} {obj}. {he} {lose} {b} on Monday and {c} on Tuesday. How many {obj} are left?", [_step("a-b=x", MONDAY), _step("x-c=y", TUESDAY)]),
        ("{name} has {a} {obj}, {friend} has {b} and {friend2} has {c}. How many {obj} do they have altogether?", [_step("a+b=x", PAIR_HAS), _step("x+c=y", ALL_THREE)]),
    ][kind]  # fmt: skip
    if kind == 1:  # c is not part of this question
        return MathProblem(question.format(a=a, b=b, **w), {"a": a, "b": b}, steps, w, level=2)
    return MathProblem(question.format(a=a, b=b, c=c, **w), {"a": a, "b": b, "c": c}, steps, w, level=2)


def _level3(rng: random.Random) -> MathProblem:
    """A multiplication and a second step, or three steps; numbers up to 20."""
    w, kind = _people(rng), rng.randrange(4)
    if kind == 0:  # a * b - c
        values = {"a": rng.randint(2, 5), "b": rng.randint(2, 4)}
        values["c"] = rng.randint(1, values["a"] * values["b"] - 1)
    elif kind == 1:  # c + a * b
        values = {"a": rng.randint(2, 4), "b": rng.randint(2, 4)}
        values["c"] = rng.randint(1, 20 - values["a"] * values["b"])
    elif kind == 2:  # a + b - c + d
        a = rng.randint(2, 17)
        b = rng.randint(1, 19 - a)
        c = rng.randint(1, a + b - 1)
        values = {"a": a, "b": b, "c": c, "d": rng.randint(1, 20 - (a + b - c))}
    else:  # a + a * b
        values = {"a": rng.randint(2, 5), "b": rng.randint(2, 3)}
    question, steps = [
        ("{name} buys {a} {boxes} of {obj}. Each {box} has {b} {obj}. {he} {lose} {c} of them. How many {obj} are left?", [_step("a*b=x", BUYS), _step("x-c=y", LEFT)]),
        ("{name} has {c} {obj}. {he} buys {a} {boxes} with {b} {obj} in each. How many {obj} does {name} have now?", [_step("a*b=x", BOXES_HAVE), _step("c+x=y", NOW_HAS)]),
        ("{name} has {a} {obj}. {he} {gain} {b} more, {lose} {c}, and then gets {d} more. How many {obj} does {name} have now?", [_step("a+b=x", FIRST), _step("x-c=y", THEN), _step("y+d=z", AT_THE_END)]),
        ("{name} has {a} {obj}. {friend} has {b} times as many {obj} as {name}. How many {obj} do they have together?", [_step("a*b=x", FRIEND_HAS), _step("a+x=y", TOGETHER)]),
    ][kind]  # fmt: skip
    return MathProblem(question.format(**values, **w), values, steps, w, level=3)


GENERATORS: dict[int, Callable[[random.Random], MathProblem]] = {1: _level1, 2: _level2, 3: _level3}


def generate_math(
    rng: random.Random, n_train_per_level: int, n_test_per_level: int
) -> tuple[list[MathProblem], list[MathProblem]]:
    """Unique problems per level, split so that no test question is a train question; levels interleaved."""
    train: list[MathProblem] = []
    test: list[MathProblem] = []
    for level in LEVELS:
        unique: dict[str, MathProblem] = {}  # a dict, not a set: iteration order must not depend on hashing
        while len(unique) < n_train_per_level + n_test_per_level:
            problem = GENERATORS[level](rng)
            unique.setdefault(problem.question, problem)
        problems = list(unique.values())
        test.extend(problems[:n_test_per_level])
        train.extend(problems[n_test_per_level:])
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test
