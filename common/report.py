"""What a run shows beside its numbers: loss.png, the loggers TRL reports to, and the closing summary in the terminal."""
import importlib.util
from pathlib import Path

from common.distributed import processes_line
from common.errors import UserError

LOGGERS = ("tensorboard", "wandb", "trackio")  # each is also the package TRL needs for it


def loggers(report_to: str) -> list[str]:
    """SFTConfig's report_to for --report-to (none, tensorboard, wandb, trackio; comma-separated), each checked to be
    installed."""
    names = [name.strip() for name in report_to.split(",") if name.strip() and name.strip() != "none"]
    for name in names:
        if name not in LOGGERS:
            raise UserError(f"--report-to {report_to}: use none or some of {', '.join(LOGGERS)}")
        if importlib.util.find_spec(name) is None:
            raise UserError(f"--report-to {name}: the {name} package is not installed; pip install {name}")
    return names or ["none"]


def plot_losses(curves: dict[str, list[dict]], path: Path):
    """Train loss, eval loss and, where logged, its moving average against step: one set of lines per curve label
    (a run, a rank of a sweep, a side of a study)."""
    import matplotlib
    matplotlib.use("Agg")  # PNGs only: no display on a training box
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for label, records in curves.items():
        prefix = f"{label} " if label else ""
        for key, name, style in (("loss", "train loss", "-"), ("eval_loss", "eval loss", "o-"),
                                 ("eval_loss_moving_avg", "eval loss, moving average", "--")):
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if points:
                axes.plot(*zip(*points), style, label=prefix + name, markersize=4, linewidth=1.2)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=8)
    else:
        axes.text(0.5, 0.5, "no loss was logged", ha="center", va="center", transform=axes.transAxes)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def number(value, unit: str = "", digits: int = 2) -> str:
    """A figure for results.md and the terminal; n/a where it was not measured (GPU memory on CPU)."""
    return "n/a" if value is None else f"{value:,.{digits}f}{unit}"


def throughput_line(throughput: dict) -> str:
    """results.md's line on what training cost (MetricsRecorder.summary())."""
    return (f"- median step time {number(throughput['median_step_time_s'], ' s')}, "
            f"{number(throughput['tokens_per_s'], ' tokens/s', 0)}, peak GPU memory "
            f"{number(throughput['peak_gpu_memory_gib'], ' GiB')}{per_gpu(throughput)}")


def print_summary(recipe: str, folder: Path, throughput: dict, records: list[dict]):
    """The end of a run in a few lines: what it cost (MetricsRecorder.summary()), the lowest eval loss in its metrics
    records, and what to type next."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{recipe} finished", show_header=False, title_justify="left")
    table.add_row("training time", number(throughput.get("train_seconds"), " s", 1))
    table.add_row("tokens trained", number(throughput.get("tokens_trained"), "", 0))
    table.add_row("tokens/s", number(throughput.get("tokens_per_s"), "", 0))
    table.add_row("peak GPU memory", number(throughput.get("peak_gpu_memory_gib"), " GiB"))
    if throughput.get("world_size"):
        table.add_row("spread over", processes_line())
        table.add_row("tokens/s a process", number(throughput["tokens_per_s_per_gpu"], "", 0))
        table.add_row("peak a GPU", " / ".join(number(peak, " GiB") for peak in throughput["peak_gpu_memory_gib_per_gpu"]))
    best_eval_loss = min((r["eval_loss"] for r in records if "eval_loss" in r), default=None)
    if best_eval_loss is not None:
        table.add_row("best eval loss", number(best_eval_loss, "", 4))
    console = Console()
    console.print(table)
    # Plain lines, never wrapped or cut: they are copied into the next command.
    console.print(f"results:   {folder / 'results.md'}", soft_wrap=True, highlight=False)
    console.print(f"try it:    ./run.sh chat {folder}", soft_wrap=True, highlight=False)
    console.print(f"export it: ./run.sh export {folder} --format gguf", soft_wrap=True, highlight=False)


def per_gpu(throughput: dict) -> str:
    """For results.md: how a run on several GPUs shared the work ("" on one)."""
    if not throughput.get("world_size"):
        return ""
    peaks = " / ".join(number(peak) for peak in throughput["peak_gpu_memory_gib_per_gpu"])
    return (f"; on {processes_line()} together, {number(throughput['tokens_per_s_per_gpu'], '', 0)} tokens/s a process, "
            f"peak GiB by GPU {peaks}")
