"""`./run.sh <recipe> ...` checks the flags before anything heavy starts: --help, a mistyped flag or a value no run can
use answer in a second, without importing Unsloth (about 15 s) and before the set-up installs anything.

  python -m common.preflight recipes/llama3_8b.py --learning-rate -1   -> error: --learning-rate -1.0: must be ...

The recipe's Config and SMOKE are read from its source (the class, and the module's plain assignments it needs) and
resolved by common.config.parse, the same code the recipe runs: the answer is the one the recipe would give.
"""
import ast
import sys
import types
from pathlib import Path

from common.config import parse
from common.errors import UserError

LIGHT_IMPORTS = ("dataclasses", "pathlib", "typing")


def light_recipe(path: Path):
    """(Config, SMOKE) of a recipe file, executing only its Config class, its imports of LIGHT_IMPORTS and the
    top-level assignments that need nothing else (RECIPE, SAMPLE_DATA, SMOKE, ...)."""
    module = types.ModuleType(f"preflight_{path.stem}")
    module.__file__ = str(path)
    sys.modules[module.__name__] = module  # where inspect finds the Config's source for --help's reasons
    namespace = module.__dict__
    for node in ast.parse(path.read_text(), str(path)).body:
        light_import = isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in LIGHT_IMPORTS
        if not (light_import or isinstance(node, (ast.Assign, ast.AnnAssign))
                or (isinstance(node, ast.ClassDef) and node.name == "Config")):
            continue
        try:
            exec(compile(ast.Module([node], []), str(path), "exec"), namespace)
        except (NameError, AttributeError, TypeError, ImportError):
            continue  # an assignment built from what the recipe imports: not one the flags need
    return namespace["Config"], namespace.get("SMOKE", {})


def main(argv: list[str]) -> int:
    recipe = Path(argv[0])
    config_class, smoke = light_recipe(recipe)
    try:
        parse(config_class, argv[1:], smoke, recipe.stem)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ImportError:
        return 0  # --config before the set-up installed PyYAML: the recipe checks it once installed
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
