"""./run.sh notebooks [--repo OWNER/NAME]: colab/<recipe>.ipynb for every recipe, from one template, and the README's
table of "Open in Colab" links, both pointed at the address in colab/REPOSITORY (--repo writes it there first).

The address differs for every fork, so it lives in that one file. While it holds none, the notebooks open with a line
the user fills in (REPO = "https://github.com/OWNER/NAME") and the README says how to publish them instead of links.
What each notebook says a recipe trains and how it fits a T4 is read from the README's recipe table; its step count
and that count's reason from the recipe's Config. tests/test_notebooks.py fails when a recipe has no notebook or a
file differs from what this writes now.

Imports nothing heavy: it runs with any python3, before anything is installed.
"""
import argparse
import ast
import json
import re
import sys
from pathlib import Path

from common.config import REPO_ROOT, field_reasons
from common.errors import UserError, run_main
from common.preflight import light_recipe

LINKS_START = "<!-- colab links: written by ./run.sh notebooks from colab/REPOSITORY -->"
LINKS_END = "<!-- /colab links -->"
PLACEHOLDER = "OWNER/NAME"
BRANCH = "main"  # the branch Colab opens the notebooks from, and the docs they link to
T4_COLUMN = "T4 fit"  # the README recipe table's column of measured peaks, "T4 fit (fp16, 15 GiB)"
COLAB_FLAGS = {  # what a recipe's Colab launch needs beyond its defaults
    "llama32_1b_mlp": "--data /content/my_qa.jsonl",  # required: the card's data is private; the one line to edit
    "llama31_8b_qlora": "--variant instruct",  # the variant the T4 figure was measured with; base is the other
}


def recipe_names(root: Path) -> list[str]:
    """What `./run.sh list` lists: recipes/*.py but __init__."""
    return sorted(path.stem for path in (root / "recipes").glob("*.py") if path.stem != "__init__")


def read_address(root: Path) -> str | None:
    """OWNER/NAME from colab/REPOSITORY: its first line that is neither blank nor a # comment; None without one."""
    file = root / "colab" / "REPOSITORY"
    lines = file.read_text().splitlines() if file.is_file() else []
    return next((line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")), None)


def write_address(root: Path, repo: str):
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]*/[A-Za-z0-9._-]+", repo):
        raise UserError(f"--repo {repo}: expected OWNER/NAME as on GitHub (github.com/OWNER/NAME), e.g. --repo me/recipes")
    (root / "colab").mkdir(exist_ok=True)
    (root / "colab" / "REPOSITORY").write_text(
        "# This repository's public address on GitHub, OWNER/NAME, on the line below: the notebooks clone it and the\n"
        "# README links to them there. ./run.sh notebooks --repo OWNER/NAME writes it and everything made from it.\n"
        f"{repo}\n")


def recipe_table(readme: str) -> dict[str, dict[str, str]]:
    """The README's recipe table (the one with a T4 fit column): recipe -> {column header: cell}."""
    rows, header = {}, None
    for line in readme.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")] if line.startswith("|") else None
        if cells and cells[0] == "recipe" and any(cell.startswith(T4_COLUMN) for cell in cells):
            header = cells
        elif cells and header and not set(cells[0]) <= set("-: "):
            rows[cells[0].strip("`")] = dict(zip(header, cells))
        elif not cells:
            header = None
    return rows


def fits_t4(row: dict | None) -> str:
    column = next((name for name in row or {} if name.startswith(T4_COLUMN)), None)
    if not column or not row[column].startswith("yes"):
        return "not measured yet (the GPU suite's T4 run gives this figure)"
    return f"{row[column]}, measured in fp16 within 15 GiB (a T4's memory) at the card's batch and sequence length"


def duration(root: Path, recipe: str) -> str:
    """No full run is timed on a T4: the time follows the step count the card sets, whose reason the Config gives."""
    config, _ = light_recipe(root / "recipes" / f"{recipe}.py")
    steps = getattr(config(), "max_steps", None)
    count = f"`--max-steps` {steps} ({field_reasons(config).get('max_steps', 'the card')})" if steps else "the card's steps"
    return (f"not measured on a T4 yet; it trains {count}, and the progress bar shows the time left once the first "
            "steps ran. Before training: the set-up (a few minutes, once a runtime) and the model's download.")


def trains(root: Path, recipe: str, row: dict | None) -> tuple[str, str]:
    """(card, what it trains): the README table's card, method and data; for a recipe not in it yet, no card and the
    first line of the recipe's docstring."""
    if row:
        return row["card"], f"{row['method']}, on {row['data']}"
    docstring = ast.get_docstring(ast.parse((root / "recipes" / f"{recipe}.py").read_text())) or recipe
    return "", docstring.splitlines()[0].rstrip(".")


def markdown(cell_id: str, text: str) -> dict:
    return {"cell_type": "markdown", "id": cell_id, "metadata": {}, "source": text.strip().splitlines(keepends=True)}


def code(cell_id: str, text: str) -> dict:
    return {"cell_type": "code", "id": cell_id, "metadata": {}, "execution_count": None, "outputs": [],
            "source": text.strip().splitlines(keepends=True)}


def notebook(root: Path, recipe: str, repo: str | None, row: dict | None) -> dict:
    card, what = trains(root, recipe, row)
    flags = COLAB_FLAGS.get(recipe, "")
    launch = f"./run.sh {recipe}{' ' + flags if flags else ''}"
    docs = {path: f"[{path}](https://github.com/{repo}/blob/{BRANCH}/{path})" if repo else f"`{path}`"
            for path in ("docs/gpu-tests.md", "docs/data.md", "docs/colab.md", "docs/after-training.md")}
    address = [f'REPO = "https://github.com/{repo}"'] if repo else [
        f'REPO = "https://github.com/{PLACEHOLDER}"  # fill in: this repository\'s address on GitHub',
        f'assert "{PLACEHOLDER}" not in REPO, "fill in REPO, the address these recipes are on"']
    fill_in = "" if repo else (
        "Fill in `REPO` in the training and resume cells first, or have the repository's owner run "
        f"`./run.sh notebooks --repo {PLACEHOLDER}`, which writes it into every notebook.")
    clone = "%cd /content\n![ -d recipes ] || git clone --depth 1 {REPO} recipes\n%cd /content/recipes"
    upload, upload_again = ("", "") if "--data" not in flags else (
        "Upload your data file first (the folder icon on the left) as `/content/my_qa.jsonl`, or change that path: "
        f"one on Drive outlives the runtime ({docs['docs/data.md']} lists the formats).",
        "The run reads its data file again: upload it to the same path first, or add `--data` with its new path.")
    return {"nbformat": 4, "nbformat_minor": 5, "metadata": {
        "accelerator": "GPU", "colab": {"gpuType": "T4", "name": f"{recipe}.ipynb", "provenance": []},
        "kernelspec": {"display_name": "Python 3", "name": "python3"}, "language_info": {"name": "python"}}, "cells": [
        markdown("title", f"""
# {recipe}{": " + card if card else ""}

**Trains** {what}.

**On Colab's free T4:** {fits_t4(row)} ({docs['docs/gpu-tests.md']}). Runtime > Change runtime type > T4 GPU.

**How long:** {duration(root, recipe)}

Run the cells from the top: the Drive cell is optional, the cells after training are what people do next.
{fill_in}
"""),
        markdown("drive-why", """
## Keep the run on Google Drive (optional, before training)
A runtime that ends (a free one does after some hours) takes `/content` with it, the run included. With Drive
mounted, the training cell writes the run to `MyDrive/runs`, where a new runtime resumes it.
"""),
        code("drive", 'from google.colab import drive; drive.mount("/content/drive")'),
        markdown("train-why", f"""
## Train
Clones the recipes (a second run in this runtime reuses the clone) and starts `{launch}`: its first run in a runtime
installs Unsloth into Colab's Python, and the precision follows the GPU (fp16 on a T4).
{upload}
To stop, press the cell's stop button once and wait: the step finishes and a checkpoint is written.
"""),
        code("train", "\n".join([*address, "import glob, os", "# on Drive the run outlives the runtime",
                                 'RUNS = "/content/drive/MyDrive/runs" if os.path.isdir("/content/drive/MyDrive") '
                                 'else "/content/recipes/outputs"', clone, f"!{launch} --output-dir {{RUNS}}"])),
        markdown("resume-why", f"""
## Resume in a new runtime
Mounts Drive and continues the newest run of `{recipe}` there that did not finish, from its newest complete
checkpoint and with its own settings ({docs['docs/colab.md']}).
{upload_again}
"""),
        code("resume", "\n".join([*address, 'from google.colab import drive; drive.mount("/content/drive")',
                                  "import glob, os", 'RUNS = "/content/drive/MyDrive/runs"', clone,
                                  "# a run is finished once it wrote results.md, its last file",
                                  f'unfinished = [run for run in sorted(glob.glob(f"{{RUNS}}/{recipe}/*")) '
                                  'if not os.path.exists(f"{run}/results.md")]',
                                  "if unfinished:", "    RESUME = unfinished[-1]",
                                  f'    !./run.sh {recipe} --resume "{{RESUME}}"', "else:",
                                  f'    print(f"nothing to resume: no unfinished {recipe} run in {{RUNS}}")'])),
        markdown("run-why", """
## The run the next cells use
The newest finished run, in the folder the training or resume cell used.
"""),
        code("run", "\n".join([f'finished = sorted(glob.glob(f"{{RUNS}}/{recipe}/*/results.md"))',
                               f'assert finished, f"no finished {recipe} run in {{RUNS}}: train or resume first"',
                               "RUN = os.path.dirname(finished[-1])", "print(RUN)"])),
        markdown("chat-why", """
## Chat
One reply from the trained model. Without `--prompt` the chat goes back and forth in the cell's input box (`/exit`
leaves); `--base` answers without the adapter, to compare.
"""),
        code("chat", '!./run.sh chat "{RUN}" --prompt "What can you help me with?"'),
        markdown("export-why", f"""
## Export to the runtime's disk
GGUF files and a Modelfile for llama.cpp, LM Studio and Ollama (`--format merged16`: 16-bit weights for transformers
and vLLM). They go to the runtime's disk, not Drive: an 8B model's exports take more than a free Drive holds, so copy
what you keep. The first GGUF export builds llama.cpp, about 11 minutes on Colab's 2 cores
({docs['docs/after-training.md']}).
"""),
        code("export", '!./run.sh export "{RUN}" --format gguf --export-dir /content/export'),
        markdown("push-why", f"""
## Push the adapter to the Hugging Face hub
Add a write token as the secret `HF_TOKEN` (the key icon on the left) and let this notebook read it. The adapter alone
(tens of MB) goes to your account as `{recipe}-lora`; `--private` keeps it to you, and `--format gguf --export-dir
/content/export` pushes the GGUF export above instead.
"""),
        code("push", "\n".join(["# Colab's secrets are not environment variables; the export reads HF_TOKEN from the environment",
                                "import os", "from google.colab import userdata", "from huggingface_hub import whoami",
                                'os.environ["HF_TOKEN"] = userdata.get("HF_TOKEN")',
                                f"HUB_REPO = f'{{whoami()[\"name\"]}}/{recipe}-lora'",
                                '!./run.sh export "{RUN}" --format adapter --push-to-hub {HUB_REPO}'])),
    ]}


def links(root: Path, repo: str | None, rows: dict, recipes: list[str]) -> str:
    """What goes between the README's markers: a table of Colab links, or how to make them."""
    if not repo:
        return ("No links yet: `colab/REPOSITORY` holds no address. To publish the notebooks, run this once where the\n"
                "repository is public on GitHub (a fork: with its own OWNER/NAME) and commit what it writes:\n\n"
                f"    ./run.sh notebooks --repo {PLACEHOLDER}\n")
    badge = "https://colab.research.google.com/assets/colab-badge.svg"
    lines = ["| recipe | trains | on a free T4 | notebook |", "|---|---|---|---|"]
    for recipe in recipes:
        row = rows.get(recipe) or {}
        fit = next((value for name, value in row.items() if name.startswith(T4_COLUMN)), "not measured yet")
        url = f"https://colab.research.google.com/github/{repo}/blob/{BRANCH}/colab/{recipe}.ipynb"
        lines.append(f"| `{recipe}` | {row.get('card') or trains(root, recipe, row)[1]} | {fit} | "
                     f"[![Open In Colab]({badge})]({url}) |")
    return "\n".join(lines) + "\n"


def generated(root: Path = REPO_ROOT) -> dict[Path, str]:
    """Every file the generator writes, with the text it writes: the notebooks and README.md."""
    readme_path = root / "README.md"
    readme = readme_path.read_text()
    if readme.count(LINKS_START) != 1 or readme.count(LINKS_END) != 1:
        raise UserError(f"{readme_path} needs the lines {LINKS_START} and {LINKS_END} once each, in its Colab "
                        "section: the links go between them")
    repo, rows, recipes = read_address(root), recipe_table(readme), recipe_names(root)
    before, rest = readme.split(LINKS_START)
    after = rest.split(LINKS_END)[1]
    files = {root / "README.md": f"{before}{LINKS_START}\n{links(root, repo, rows, recipes)}{LINKS_END}{after}"}
    for recipe in recipes:
        text = json.dumps(notebook(root, recipe, repo, rows.get(recipe)), indent=1, ensure_ascii=False)
        files[root / "colab" / f"{recipe}.ipynb"] = text + "\n"
    return files


def main(argv: list[str], root: Path = REPO_ROOT):
    parser = argparse.ArgumentParser(prog="./run.sh notebooks", description="colab/<recipe>.ipynb for every recipe and "
                                     "the README's Colab links, pointed at the address in colab/REPOSITORY")
    parser.add_argument("--repo", metavar="OWNER/NAME", help="this repository on GitHub: written to colab/REPOSITORY")
    args = parser.parse_args(argv)
    if args.repo:
        write_address(root, args.repo)
    files = generated(root)
    (root / "colab").mkdir(exist_ok=True)
    for stale in set((root / "colab").glob("*.ipynb")) - set(files):
        stale.unlink()
        print(f"removed {stale.relative_to(root)}: no recipe {stale.stem}")
    for path, text in files.items():
        path.write_text(text)
    repo = read_address(root)
    print(f"wrote {len(files) - 1} notebooks in colab/ and the README's Colab "
          + (f"links, for github.com/{repo}" if repo else
             f"section without links: no address yet (./run.sh notebooks --repo {PLACEHOLDER} writes them)"))


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
