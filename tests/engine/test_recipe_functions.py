"""Each recipe reads top to bottom as setup, then the loop: no function in kd_pipeline/recipes/ is over 60 lines."""

import ast
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[2] / "kd_pipeline" / "recipes"
MAX_LINES = 60


def test_no_recipe_function_is_longer_than_60_lines():
    long = []
    for path in sorted(RECIPES.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_LINES:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({length} lines)")
    assert not long, long
