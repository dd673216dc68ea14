"""The layering is a DAG: `recipes.common` (the lower layer) imports nothing from `eval`; `eval` imports from the
recipes only `recipes.common`; the recipe stages may import both. Read from the source with `ast`, every import
counted, those inside functions too (a late import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def violations(folder: str, allowed: callable) -> list[str]:
    return [
        f"{path.relative_to(REPO_ROOT)}:{line}: imports {module}"
        for path in sorted((REPO_ROOT / folder).rglob("*.py"))
        for line, module in imported_modules(path)
        if not allowed(module)
    ]


def test_the_lower_layer_imports_nothing_from_eval() -> None:
    assert violations("recipes/common", lambda m: m != "eval" and not m.startswith("eval.")) == []


def test_eval_imports_only_the_lower_layer_of_the_recipes() -> None:
    def allowed(module: str) -> bool:
        return not (module == "recipes" or module.startswith("recipes.")) or module.startswith("recipes.common")

    assert violations("eval", allowed) == []


def test_the_check_sees_late_imports(tmp_path: Path) -> None:
    source = tmp_path / "late.py"
    source.write_text("def f():\n    from eval.data import read_jsonl\n    import recipes.ppo.train\n")
    assert imported_modules(source) == [(2, "eval.data"), (3, "recipes.ppo.train")]
