"""Small helpers shared by the tasks: the user-facing error type and seeded subsets. (JSON Lines reading and atomic
writes are `recipes.common.files`; the outputs/demo hint is `recipes.common.errors.demo_hint`.)"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

from recipes.common.errors import UserError

T = TypeVar("T")


class EvalError(UserError):
    """A problem the user must fix (bad task name, missing file, malformed record); the message says what,
    where and how to fix it."""


def seeded_subset(items: Sequence[T], size: int | None, seed: int) -> list[T]:
    """A fixed random subset (original order kept), so that every evaluation during training sees the same items."""
    if size is None or size >= len(items):
        return list(items)
    picked = sorted(random.Random(seed).sample(range(len(items)), size))
    return [items[i] for i in picked]
