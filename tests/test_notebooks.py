"""colab/: one notebook per recipe, each exactly what `./run.sh notebooks` (common/notebooks.py) writes now, valid, and
launching its recipe with flags the recipe takes; the address in colab/REPOSITORY alone; and llama3_8b's notebook
executed as Colab would run it, by a real IPython kernel, against a clone of this working tree."""
import copy
import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from common import notebooks
from common.config import RunOptions
from common.errors import UserError
from common.preflight import light_recipe
from common.preflight import main as preflight
from tests.conftest import REPO

RECIPES = notebooks.recipe_names(REPO)
LAUNCH = re.compile(r"^!\./run\.sh (\w+) (.*)$", re.MULTILINE)


def read(recipe: str, root: Path = REPO):
    return nbformat.reads((root / "colab" / f"{recipe}.ipynb").read_text(), as_version=4)


def cell(notebook, cell_id: str):
    return next(c for c in notebook.cells if c.id == cell_id)


def test_every_recipe_has_its_notebook_as_the_generator_writes_it():
    assert sorted(path.stem for path in (REPO / "colab").glob("*.ipynb")) == RECIPES, \
        "colab/ holds a notebook per recipe: run ./run.sh notebooks"
    stale = [str(path.relative_to(REPO)) for path, text in notebooks.generated(REPO).items()
             if not path.is_file() or path.read_text() != text]
    assert not stale, f"{stale}: not what the generator writes now; run ./run.sh notebooks"


@pytest.mark.parametrize("recipe", RECIPES)
def test_notebook_is_valid_and_launches_its_recipe_with_flags_it_takes(recipe, tmp_path):
    notebook = read(recipe)
    nbformat.validate(notebook)
    (name, flags), = LAUNCH.findall(cell(notebook, "train").source)
    path = REPO / "recipes" / f"{name}.py"
    assert name == recipe and path.is_file()
    argv = shlex.split(flags.replace("{RUNS}", str(tmp_path / "runs")))
    # preflight passes any unknown --flag on to the trainer's arguments: a notebook names only the recipe's own
    config, _ = light_recipe(path)
    fields = {field.name for field in dataclasses.fields(config) + dataclasses.fields(RunOptions)}
    assert {arg[2:].replace("-", "_") for arg in argv if arg.startswith("--")} <= fields
    assert preflight([str(path), *argv]) == 0


def test_notebooks_differ_from_llama3_8b_only_in_the_recipes_own_lines():
    """Only llama3_8b's notebook is executed below; the others run the same code but for the recipe and its flags."""
    def template(recipe):
        flags = notebooks.COLAB_FLAGS.get(recipe)
        def generic(source):
            return (source.replace(f" {flags}", "") if flags else source).replace(recipe, "RECIPE")
        return [(c.id, c.cell_type, generic(c.source) if c.cell_type == "code" else None) for c in read(recipe).cells]
    for recipe in RECIPES:
        assert template(recipe) == template("llama3_8b"), recipe


@pytest.fixture
def checkout(tmp_path):
    """The generator's inputs (README.md, recipes/, colab/REPOSITORY), copied: it writes only there."""
    root = tmp_path / "repo"
    shutil.copytree(REPO / "recipes", root / "recipes", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "README.md", root / "README.md")
    (root / "colab").mkdir()
    (root / "colab" / "REPOSITORY").write_text("# OWNER/NAME on the line below\n")
    return root


def links_block(readme: str) -> str:
    return readme.split(notebooks.LINKS_START)[1].split(notebooks.LINKS_END)[0]


def test_without_an_address_the_notebooks_ask_for_it_and_the_readme_says_how_to_publish(checkout, capsys):
    notebooks.main([], checkout)
    train = cell(read("llama3_8b", checkout), "train").source
    assert train.splitlines()[0] == 'REPO = "https://github.com/OWNER/NAME"  # fill in: this repository\'s address on GitHub'
    readme = (checkout / "README.md").read_text()
    assert "colab.research.google.com" not in readme and "./run.sh notebooks --repo OWNER/NAME" in links_block(readme)
    assert "no address yet" in capsys.readouterr().out


def test_repo_points_every_notebook_and_the_links_at_itself_and_new_recipes_get_theirs(checkout):
    shutil.copy(checkout / "recipes" / "llama3_8b.py", checkout / "recipes" / "my_llama.py")
    (checkout / "colab" / "gone.ipynb").write_text("{}")
    readme_before = (checkout / "README.md").read_text()
    notebooks.main(["--repo", "someone/fork"], checkout)
    assert notebooks.read_address(checkout) == "someone/fork"
    assert sorted(path.stem for path in (checkout / "colab").glob("*.ipynb")) == sorted([*RECIPES, "my_llama"])
    for recipe in [*RECIPES, "my_llama"]:
        notebook = read(recipe, checkout)
        for cell_id in ("train", "resume"):
            assert cell(notebook, cell_id).source.splitlines()[0] == 'REPO = "https://github.com/someone/fork"'
        assert "OWNER/NAME" not in json.dumps(notebook)
    assert cell(read("my_llama", checkout), "title").source.startswith("# my_llama\n\n**Trains** Llama-3-8B")
    readme = (checkout / "README.md").read_text()
    for recipe in [*RECIPES, "my_llama"]:
        assert f"https://colab.research.google.com/github/someone/fork/blob/main/colab/{recipe}.ipynb" in readme
    assert readme.replace(links_block(readme), "") == readme_before.replace(links_block(readme_before), "")
    with pytest.raises(UserError, match="--repo someone: expected OWNER/NAME"):
        notebooks.main(["--repo", "someone"], checkout)


def working_tree_repository(destination: Path) -> Path:
    """A git repository of this working tree as it stands, uncommitted changes included (a clone of this checkout
    would have its last commit only), without what git ignores (.venv, outputs, .export-tools)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in listed:
        if name and (REPO / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, destination / name)
    git = ["git", "-C", str(destination), "-c", "user.name=test", "-c", "user.email=test@localhost"]
    subprocess.run(["git", "init", "-q", "-b", "main", str(destination)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "working tree"], check=True)
    return destination


def test_llama3_8b_notebook_runs_as_on_colab(tmp_path):
    """Every code cell in order, in an IPython kernel (so `!` lines and %cd behave as in Colab), with /content under
    tmp_path, the clone address pointed at this working tree, --smoke on the launch line and Colab's own services
    replaced by their local stand-ins; then the training cell once more in the same place, which must reuse the clone
    (asking the launch line for --help there: a second smoke run would test nothing more)."""
    source = working_tree_repository(tmp_path / "source")
    content = tmp_path / "content"
    content.mkdir()
    colab_to_local = [  # (the notebook's text, what stands in for it here), applied to every code cell in this order
        (re.compile(r'^REPO = "https://github\.com/.*$', re.MULTILINE), f'REPO = "{source.as_uri()}"'),
        ("!./run.sh llama3_8b --output-dir", "!./run.sh llama3_8b --smoke --output-dir"),
        ('from google.colab import drive; drive.mount("/content/drive")',  # Drive: a folder where Colab mounts it
         'import os; os.makedirs("/content/drive/MyDrive", exist_ok=True)'),
        ("from google.colab import userdata\n", ""),
        ('userdata.get("HF_TOKEN")', '"hf_made_up_token"'),  # a secret: a made-up token
        ('whoami()["name"]', '"notebook-test"'),  # the hub is out of reach here (HF_HUB_OFFLINE below)
        ("/content", str(content)),
    ]
    notebook = read("llama3_8b")
    for pattern, local in colab_to_local:
        regex, found = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern)), 0
        for c in notebook.cells:
            if c.cell_type == "code":
                c.source, count = regex.subn(lambda match: local, c.source)
                found += count
        assert found, f"no code cell holds {pattern!r} any more: update this table"
    again = copy.deepcopy(cell(notebook, "train"))
    again.id, again.source = "train-again", again.source.replace("--smoke", "--smoke --help")
    notebook.cells.append(again)

    # The kernel's environment is this test's (VIRTUAL_ENV: run.sh finds it set up and installs nothing); the hub is
    # kept out of reach, so the push cell gets as far as the upload and says why it stopped.
    env = {**os.environ, "VIRTUAL_ENV": sys.prefix, "HF_HUB_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    client = NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(content)}})
    outputs = {}
    with client.setup_kernel(env=env):
        for index, c in enumerate(notebook.cells):
            if c.cell_type != "code":
                continue
            if c.id == "export":  # llama.cpp as ./run.sh test built it here: building it again takes 11 minutes
                (content / "recipes" / ".export-tools").symlink_to(REPO / ".export-tools")
            client.execute_cell(c, index)
            outputs[c.id] = "".join(output.get("text", "") for output in c.outputs)
    shown = "\n".join(f"--- {cell_id}\n{text[-3000:]}" for cell_id, text in outputs.items())

    runs = sorted((content / "drive" / "MyDrive" / "runs" / "llama3_8b").iterdir())
    assert len(runs) == 1 and (runs[0] / "results.md").is_file(), shown
    manifest = json.loads((runs[0] / "manifest.json").read_text())
    head = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert manifest["git_commit"] == head.strip() and manifest["command"].startswith("./run.sh llama3_8b --smoke")
    assert outputs["run"].strip() == str(runs[0])
    assert (content / "export" / "gguf" / "llama3_8b-q4_k_m.gguf").is_file(), shown
    assert "--push-to-hub notebook-test/llama3_8b-lora: the upload failed" in outputs["push"], shown
    assert "Traceback" not in shown and not [line for cell_id, text in outputs.items() if cell_id != "push"
                                             for line in text.splitlines() if line.startswith("error:")], shown

    assert "Cloning into 'recipes'" in outputs["train"], shown
    assert "nothing to resume" in outputs["resume"] and "Cloning" not in outputs["resume"], shown
    assert "Cloning" not in outputs["train-again"] and "usage: ./run.sh llama3_8b" in outputs["train-again"], shown
    assert not (content / "recipes" / "recipes" / ".git").exists()
