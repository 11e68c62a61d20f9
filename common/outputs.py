"""The run folder: outputs/<recipe>/<UTC timestamp>/, never overwritten, marked FAILED when a run does not finish.

config.json      the recipe, resolved hyperparameters and run options (--resume reads them back)
run.json         what chat and export load: base model, 4-bit or not, chat template, system prompt, adapters, figures
                 (common/record.py)
manifest.json    the command typed, versions, GPU, precision and optimiser that ran, the model trained, seed, data
                 source and SHA-256, git commit, how a step was batched
metrics.jsonl    one line per log: loss, eval loss, learning rate, step time, tokens/s, peak memory
checkpoints/     trainer checkpoints, for --resume
adapter/         the trained LoRA adapter and tokenizer (written last, atomically)
loss.png         train and eval loss against step, shown in results.md
results.md       the human summary; present only when the run completed
"""
import contextlib
import dataclasses
import json
import platform
import shutil
import signal
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from common import distributed
from common.errors import UserError, is_out_of_memory, OOM_HINT
from common.hardware import vram_gib

from common.config import REPO_ROOT

PACKAGES = ("unsloth", "unsloth_zoo", "torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "accelerate",
            "xformers")  # xformers: which attention kernel padding-free batches get (None: torch's own)


class RunFolder:
    """Under torchrun every rank holds the folder (checkpoints are written by all of them: each its own RNG state) but
    only rank 0 writes the run's files."""

    def __init__(self, path: Path, created: bool = False):
        self.path = path
        self.created = created  # by this run: a mistake found before training leaves no folder behind
        self.checkpoints = path / "checkpoints"
        self.metrics = path / "metrics.jsonl"
        self.adapter = path / "adapter"
        self.smoke_base = path / "smoke-base"  # --smoke only: the tiny base model the adapter was trained on

    @classmethod
    def create(cls, recipe: str, root: str = "outputs") -> "RunFolder":
        path = cls._new_path(recipe, root) if distributed.is_main() else None
        return cls(Path(distributed.from_main(str(path))), created=True)

    @staticmethod
    def _new_path(recipe: str, root: str) -> Path:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        base = Path(root) / recipe
        base.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, 1000):
            path = base / (stamp if attempt == 1 else f"{stamp}-{attempt}")
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue
        raise UserError(f"{base}: could not find a free run folder name")

    @classmethod
    def reopen(cls, path: str) -> "RunFolder":
        folder = cls(Path(path))
        if (folder.path / "results.md").exists():
            raise UserError(f"--resume {path}: that run already completed; start a new run instead")
        saved = folder.path / "config.json"
        saved_ranks = json.loads(saved.read_text()).get("world_size", 1) if saved.is_file() else 1
        if saved_ranks != distributed.world_size():
            raise UserError(f"--resume {path}: that run trained on {saved_ranks} GPU(s) and its checkpoints hold "
                            f"{saved_ranks} ranks' states; resume it with --gpus {saved_ranks}")
        if distributed.is_main():
            folder._clean_for_resume()
        distributed.barrier()  # the other ranks then find only complete checkpoints
        return folder

    def _clean_for_resume(self):
        """Remove what the Trainer could not resume from, and what was logged after the checkpoint it resumes from."""
        newest = self.last_checkpoint()
        for checkpoint in self.checkpoint_folders():
            problem = checkpoint_problem(checkpoint)
            if problem:  # unusable, and a later rotation could otherwise delete a good one in its favour
                print(f"resume: skipping {checkpoint.name} ({problem}: written when the run was killed); removed it")
                shutil.rmtree(checkpoint)
        step = int(Path(newest).name.split("-")[1]) if newest else 0
        print(f"resume: continuing from {Path(newest).name}" if newest else
              f"resume: no complete checkpoint in {self.checkpoints}; training again from step 0 in this folder")
        self.trim_metrics_after(step)
        for marker in ("FAILED", "STOPPED"):
            (self.path / marker).unlink(missing_ok=True)

    def checkpoint_folders(self) -> list[Path]:
        return sorted(self.checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))

    def last_checkpoint(self) -> str | None:
        """The newest checkpoint the Trainer can resume from (see checkpoint_problem); None when there is none."""
        complete = [c for c in self.checkpoint_folders() if checkpoint_problem(c) is None]
        return str(complete[-1]) if complete else None

    def logged(self) -> list[dict]:
        """The records of metrics.jsonl (none before the first log)."""
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line] if self.metrics.exists() else []

    def trim_metrics_after(self, step: int) -> list[dict]:
        """Drop metrics logged after `step` (a resumed run logs them again); returns the lines kept."""
        kept = [record for record in self.logged() if record["step"] <= step]
        self.metrics.write_text("".join(json.dumps(record) + "\n" for record in kept))
        return kept

    def write_json(self, name: str, payload: dict):
        if not distributed.is_main():
            return
        (self.path / name).write_text(json.dumps(payload, indent=2, default=str) + "\n")

    def write_config(self, cfg, run, recipe: str):
        self.write_json("config.json", {"recipe": recipe, "hyperparameters": dataclasses.asdict(cfg),
                                        "run": dataclasses.asdict(run), "world_size": distributed.world_size()})

    def save_adapter(self, model, tokenizer):
        if not distributed.is_main():
            return
        staging = self.path / "adapter.partial"
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(self.adapter)

    def write_results(self, markdown: str, loss_curves: dict[str, list[dict]]):
        """The last file a run writes: its presence means the run completed. loss.png is drawn from `loss_curves`
        (label -> metrics records) and shown under the title."""
        from common.report import plot_losses
        plot_losses(loss_curves, self.path / "loss.png")
        title, _, body = markdown.partition("\n")
        (self.path / "results.md").write_text(f"{title}\n\n![train and eval loss against step](loss.png)\n{body.rstrip()}\n")

    def mark_stopped(self, step: int, recipe: str, signum: int | None = None):
        """STOPPED with the command that continues the run; stopped by a signal, the process then exits 128 + its
        number, as a process that signal ends does, so a scheduler sees the run did not finish."""
        why = f"on {signal.Signals(signum).name}" if signum else "as asked"
        gpus = f" --gpus {distributed.world_size()}" if distributed.world_size() > 1 else ""
        message = f"stopped after step {step} {why}; continue with: ./run.sh {recipe} --resume {self.path}{gpus}"
        if distributed.is_main():
            (self.path / "STOPPED").write_text(message + "\n")
        print(message)
        if signum:
            raise SystemExit(128 + signum)

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if error is None or isinstance(error, SystemExit):
            return False
        if isinstance(error, UserError) and self.created and not self.checkpoint_folders():
            if distributed.is_main():  # the user's input was wrong: nothing ran that a folder should keep
                shutil.rmtree(self.path, ignore_errors=True)
                with contextlib.suppress(OSError):
                    self.path.parent.rmdir()  # outputs/<recipe>/, when this was its first run
            return False
        if isinstance(error, KeyboardInterrupt):
            reason = f"interrupted; continue with --resume {self.path}"
        elif is_out_of_memory(error):
            reason = OOM_HINT
        else:
            reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        if distributed.world_size() > 1:  # any rank may fail first (out of memory on its rows): it says so
            reason = f"rank {distributed.rank()}: {reason}"
        (self.path / "FAILED").write_text(reason + "\n")
        print(f"run folder marked FAILED: {self.path}", file=sys.stderr)
        return False


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why the Trainer could not resume from this checkpoint folder; None when it is complete. The Trainer writes the
    adapter, optimizer, scheduler and RNG states, then trainer_state.json last: a kill during the write leaves a file
    missing or trainer_state.json absent, unreadable or at another step."""
    needed = ["trainer_state.json", "optimizer.pt", "scheduler.pt", "adapter_model.safetensors"]
    ranks = distributed.world_size()  # the Trainer saves each rank's RNG state: rng_state_<rank>.pth under torchrun
    needed += ["rng_state.pth"] if ranks == 1 else [f"rng_state_{rank}.pth" for rank in range(ranks)]
    missing = [name for name in needed if not (checkpoint / name).is_file()]
    if missing:
        return "no " + ", ".join(missing)
    try:
        step = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
    except (ValueError, KeyError):
        return "trainer_state.json unreadable"
    return None if step == int(checkpoint.name.split("-")[1]) else f"trainer_state.json at step {step}"


def git_commit() -> str | None:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.stdout.strip() + ("-dirty" if dirty else "")


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def optimizer_that_ran(trainer) -> str:
    """The optimiser class behind the trainer (8-bit AdamW on GPU; Unsloth's CPU backend swaps in fused AdamW)."""
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    requested = getattr(trainer.args.optim, "value", trainer.args.optim)
    return f"{type(optimizer).__module__}.{type(optimizer).__name__} (optim={requested})"


def manifest(recipe: str, hardware, seed: int, data: dict, precision: str, command: str | None = None, **extra) -> dict:
    """What reproduces and describes the run; `precision` is what the model computed in (common.hardware.precision_of),
    which on CPU can differ from what was asked."""
    from common.data import file_sha256
    return {
        "recipe": recipe,
        "command": command or " ".join(sys.argv),
        "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "gpu": hardware.gpu_name,
        "compute_capability": hardware.capability,
        "gpu_memory_total_gib": (vram_gib() or (None, None))[1],
        "precision": precision,
        "precision_requested": hardware.precision,
        "seed": seed,
        "data": {**data, "sha256": file_sha256(data["source"])},
        "packages": package_versions(),
        **extra,
    }
