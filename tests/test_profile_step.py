"""bench/profile_step.py: its interval arithmetic by hand, and a profiled window of a recipe's real steps on CPU."""
import json
import os
import subprocess
import sys

from types import SimpleNamespace

from torch.autograd import DeviceType

from bench.profile_step import breakdown, merged_length
from tests.conftest import REPO


def test_gpu_busy_time_counts_overlapping_kernels_once():
    assert merged_length([]) == 0
    assert merged_length([(0, 10), (5, 15), (20, 30)]) == 25  # 0-15 and 20-30
    assert merged_length([(20, 30), (0, 10), (10, 12)]) == 22  # unsorted, touching
    assert merged_length([(0, 100), (10, 20), (30, 40)]) == 100  # nested


def event(name: str, start: float, end: float, device=DeviceType.CPU):
    span = SimpleNamespace(start=start, end=end, elapsed_us=lambda: end - start)
    return SimpleNamespace(name=name, device_type=device, time_range=span, self_cpu_time_total=end - start)


def test_breakdown_counts_per_step_from_events():
    events = [event("aten::scaled_dot_product_attention", 0, 10), event("aten::scaled_dot_product_attention", 10, 20),
              event("aten::scaled_dot_product_attention", 20, 30), event("cudaStreamSynchronize", 30, 40),
              event("enumerate(DataLoader)#_SingleProcessDataLoaderIter.__next__", 40, 1_000_040),
              event("kernel_a", 0, 500_000, DeviceType.CUDA), event("kernel_b", 250_000, 600_000, DeviceType.CUDA)]
    figures = breakdown(events, steps=2)
    assert figures["sdpa_calls_per_step"] == 1.5 and figures["syncs_per_step"] == 0.5
    assert figures["kernel_launches_per_step"] == 1 and figures["wall_s_per_step"] == 0.50002
    assert figures["gpu_busy_s_per_step"] == 0.3 and figures["data_loading_s_per_step"] == 0.5
    assert figures["top_kernels_s"] == [["kernel_a", 0.5], ["kernel_b", 0.35]]


def profile(tmp_path, *args):
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "bench.profile_step", "llama3_8b", *args], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=600)


def test_profiles_two_steps_of_a_recipe_and_refuses_a_run_too_short_for_the_window(tmp_path):
    out = tmp_path / "profile.json"
    result = profile(tmp_path, "--skip", "2", "--steps", "2", "--json", str(out), "--", "--smoke", "--max-steps", "5",
                     "--output-dir", str(tmp_path / "runs"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["recipe"] == "llama3_8b" and figures["steps"] == 2
    assert figures["wall_s_per_step"] > 0 and figures["data_loading_s_per_step"] > 0
    assert figures["gpu_busy_share"] is None and figures["kernel_launches_per_step"] == 0  # CPU: no kernels recorded
    assert any(name.startswith("aten::") for name, _ in figures["top_host_ops_self_s"])
    assert figures["sdpa_calls_per_step"] == 0  # Unsloth's CPU backend runs eager attention (bmm, softmax)
    assert "llama3_8b: 2 profiled steps" in result.stdout and "no GPU kernels recorded" in result.stdout

    short = profile(tmp_path, "--skip", "2", "--steps", "2", "--", "--smoke", "--max-steps", "3",
                    "--output-dir", str(tmp_path / "runs"))
    assert short.returncode == 1
    assert short.stderr.strip().splitlines()[-1] == ("error: the run ended after 3 steps; give the recipe --max-steps "
                                                     "of at least 4")
