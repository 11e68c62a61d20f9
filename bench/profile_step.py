"""Where a recipe's training steps go: wall time against GPU busy time, kernel launches, host-device syncs, data
loading and the optimizer, measured with torch.profiler over a few steps of the recipe's own code.

The recipe runs in this process (its main() with the flags given); the profiler opens at the end of step `--skip`
and closes at the end of step `--skip + --steps`, through common.callbacks.MetricsRecorder, which every recipe
registers. So the window holds whole optimizer steps, their data loading included, and no model loading or compile.

  python -m bench.profile_step llama3_8b --skip 2 --steps 2 -- --model-name DIR --data FILE --max-steps 5
  python -m bench.profile_step tinyllama_sentiment --json out.json -- --smoke --max-steps 4

A step whose GPU busy share is low is host-bound: the GPU waits for Python and kernel launches, so it costs about
the same whatever the number of tokens in it, and fewer, fuller forward passes pay. Many more attention calls than
layers x passes mean attention runs once per distinct row length (Unsloth's padding-free fallback where torch has no
varlen attention and no xformers or flash-attn is installed).
"""
import argparse
import importlib
import json
import sys
from pathlib import Path

import unsloth  # noqa: F401  (first: the recipe imports it first too)

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from common.callbacks import MetricsRecorder

SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
SDPA_CALL = "aten::scaled_dot_product_attention"  # one a layer a pass, unless attention runs per row length
TOP = 8  # rows in each "where the time went" list


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[6:9]))
    parser.add_argument("recipe", help="a module name under recipes/, e.g. llama3_8b")
    parser.add_argument("--skip", type=int, default=2, help="steps run before the profiler opens (warm-up, compile)")
    parser.add_argument("--steps", type=int, default=2, help="steps inside the profiled window")
    parser.add_argument("--json", default="", help="also write the breakdown here")
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)  # after --: the recipe's own flags
    args = parser.parse_args(argv[:split])
    args.recipe_flags = argv[split + 1:]
    return args


class StepWindow:
    """Opens a profiler at the end of step `skip` and closes it at the end of step `skip + steps`."""

    def __init__(self, skip: int, steps: int):
        self.skip, self.steps = skip, steps
        self.profiler = None
        self.profiled_steps = 0
        self.closed = False

    def on_step_end(self, step: int):
        if step == self.skip and self.profiler is None:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.profiler = profile(activities=activities)
            self.profiler.__enter__()
        elif self.profiler is not None and self.profiled_steps < self.steps and step > self.skip:
            self.profiled_steps += 1
            if self.profiled_steps == self.steps:
                self.close()

    def close(self):
        """Stop recording; a profiler left open crashes the interpreter at exit (torch 2.13, CPU)."""
        if self.profiler is not None and not self.closed:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.profiler.__exit__(None, None, None)
            self.closed = True


def hook_recorder(window: StepWindow):
    """MetricsRecorder.on_step_end, followed by the window's: every recipe's steps drive the profiler."""
    original = MetricsRecorder.on_step_end

    def on_step_end(self, args, state, control, **kwargs):
        original(self, args, state, control, **kwargs)
        window.on_step_end(state.global_step)
    MetricsRecorder.on_step_end = on_step_end


def merged_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by possibly overlapping (start, end) intervals."""
    total, current_start, current_end = 0.0, None, None
    for start, end in sorted(intervals):
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    return total + (current_end - current_start if current_end is not None else 0.0)


def breakdown(events, steps: int) -> dict:
    """The window's figures from the profiler's events (times in microseconds there, seconds here)."""
    host = [e for e in events if e.device_type == DeviceType.CPU]
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    wall = (max(e.time_range.end for e in host) - min(e.time_range.start for e in host)) if host else 0.0
    busy = merged_length([(e.time_range.start, e.time_range.end) for e in kernels])

    def total(prefix: str) -> float:
        return sum(e.time_range.elapsed_us() for e in host if e.name.startswith(prefix))

    def top(rows: list, key) -> list[list]:
        sums: dict[str, float] = {}
        for event in rows:
            sums[event.name] = sums.get(event.name, 0.0) + key(event)
        return [[name[:90], round(us / 1e6, 4)] for name, us in sorted(sums.items(), key=lambda kv: -kv[1])[:TOP]]
    return {
        "steps": steps, "wall_s_per_step": wall / 1e6 / steps, "gpu_busy_s_per_step": busy / 1e6 / steps,
        "gpu_busy_share": busy / wall if wall and kernels else None,
        "kernel_launches_per_step": len(kernels) / steps,
        "syncs_per_step": sum(e.name in SYNC_CALLS for e in host) / steps,
        "sdpa_calls_per_step": sum(e.name == SDPA_CALL for e in host) / steps,
        "device_to_host_copies_per_step": sum("DtoH" in e.name or "Device -> Host" in e.name for e in kernels) / steps,
        "data_loading_s_per_step": total("enumerate(DataLoader)") / 1e6 / steps,
        "optimizer_s_per_step": total("Optimizer.step") / 1e6 / steps,
        "top_host_ops_self_s": top(host, lambda e: e.self_cpu_time_total),
        "top_kernels_s": top(kernels, lambda e: e.time_range.elapsed_us()),
    }


def report(recipe: str, figures: dict) -> str:
    share = figures["gpu_busy_share"]
    lines = [f"{recipe}: {figures['steps']} profiled steps",
             f"  wall {figures['wall_s_per_step']:.3f} s a step; GPU busy {figures['gpu_busy_s_per_step']:.3f} s "
             f"({'n/a' if share is None else f'{share:.0%}'}): "
             + ("no GPU kernels recorded" if share is None else
                "host-bound: the GPU waits for the host" if share < 0.6 else "GPU-bound"),
             f"  {figures['kernel_launches_per_step']:,.0f} kernel launches, {figures['syncs_per_step']:,.0f} host "
             f"syncs, {figures['device_to_host_copies_per_step']:,.0f} device-to-host copies a step",
             f"  {figures['sdpa_calls_per_step']:,.0f} scaled_dot_product_attention calls a step",
             f"  data loading {figures['data_loading_s_per_step']:.4f} s, optimizer "
             f"{figures['optimizer_s_per_step']:.4f} s a step",
             "  host ops by self time (s, window total):"]
    lines += [f"    {seconds:9.4f}  {name}" for name, seconds in figures["top_host_ops_self_s"]]
    lines += ["  GPU kernels by time (s, window total):"]
    lines += [f"    {seconds:9.4f}  {name}" for name, seconds in figures["top_kernels_s"]]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    window = StepWindow(args.skip, args.steps)
    hook_recorder(window)
    recipe = importlib.import_module(f"recipes.{args.recipe}")
    recipe.main(args.recipe_flags)
    window.close()
    if window.profiled_steps < args.steps:
        sys.exit(f"error: the run ended after {window.skip + window.profiled_steps} steps; give the recipe "
                 f"--max-steps of at least {args.skip + args.steps}")
    figures = breakdown(window.profiler.events(), window.profiled_steps)
    print(report(args.recipe, figures))
    if args.json:
        Path(args.json).write_text(json.dumps({"recipe": args.recipe, **figures}, indent=2) + "\n")


if __name__ == "__main__":
    main()
