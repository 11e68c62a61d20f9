"""Trainer callbacks: throughput and memory into metrics.jsonl, the moving average of eval loss, a clean stop on request."""
import json
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from common import distributed
from common.hardware import peak_memory_gib


class MovingAverageEvalLoss(TrainerCallback):
    """Adds eval_loss_moving_avg (mean of the last `window` eval losses) to every evaluation's logs.

    Register it before MetricsRecorder so the recorded evaluation carries the average.
    """

    def __init__(self, window: int, history: list[float] | None = None):
        self.window = window
        self.history = list(history or [])

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "eval_loss" in logs:
            self.history.append(logs["eval_loss"])
            recent = self.history[-self.window:]
            logs["eval_loss_moving_avg"] = sum(recent) / len(recent)


class MetricsRecorder(TrainerCallback):
    """Appends every log (loss, eval loss, learning rate) to metrics.jsonl with step time, tokens/s and peak memory.
    Under torchrun every rank counts its own tokens and memory; each training log combines them (tokens/s of all GPUs
    together, the highest peak, and both per GPU) and rank 0 alone writes the file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        # A resumed run continues the records kept from before its checkpoint.
        self.records = [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.exists() else []
        self.step_times: list[float] = []
        self._step_started = self._last_log_time = self._train_started = None
        self.train_seconds = None
        self.tokens_seen = self._last_tokens = 0  # this rank's
        self.tokens_seen_all_ranks = 0
        self.peaks_per_gpu: list[float | None] = []
        self.tokens_per_s: list[float] = []  # all ranks together

    def count_tokens_of(self, trainer):
        """Count non-padding training tokens as the collator builds each batch. Call after the trainer's collator is
        final; it works the same on Unsloth's GPU path (which may skip TRL's own token count) and on its CPU backend."""
        collate = trainer.data_collator

        def counting_collate(features):
            batch = collate(features)
            if trainer.model.training:
                mask = batch.get("attention_mask")
                self.tokens_seen += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
            return batch
        trainer.data_collator = counting_collate

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_log_time = self._train_started = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        self.train_seconds = time.perf_counter() - self._train_started

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_times.append(time.perf_counter() - self._step_started)

    def on_log(self, args, state, control, logs=None, **kwargs):
        record = {"step": state.global_step, **(logs or {})}
        now = time.perf_counter()
        if "loss" in record:  # a training log: every rank logs it at the same step, so the ranks can combine here
            counts = distributed.gathered((self.tokens_seen - self._last_tokens, peak_memory_gib()))
            tokens = sum(count for count, _ in counts)
            self.peaks_per_gpu = [peak for _, peak in counts]
            self.tokens_seen_all_ranks += tokens
            if tokens and now > self._last_log_time:
                record["tokens_per_s"] = tokens / (now - self._last_log_time)
                self.tokens_per_s.append(record["tokens_per_s"])
            self._last_tokens, self._last_log_time = self.tokens_seen, now
            if self.step_times:
                record["step_time_s"] = self.step_times[-1]
            record["peak_gpu_memory_gib"] = max((p for p in self.peaks_per_gpu if p is not None), default=None)
            if distributed.world_size() > 1:
                record["peak_gpu_memory_gib_per_gpu"] = self.peaks_per_gpu
        if "eval_loss" in record:
            average = record.get("eval_loss_moving_avg")
            note = f" (moving average {average:.4f})" if average is not None else ""
            print(f"step {state.global_step}: eval_loss {record['eval_loss']:.4f}{note}")
        self.records.append(record)
        if distributed.is_main():
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")

    def summary(self) -> dict:
        """Median step time after the first (warm-up) step, mean tokens/s and peak memory, for results and benchmarks;
        the training time and tokens of this session (a resumed run counts from its checkpoint). Several GPUs: tokens
        are all ranks' together, the peak is the highest GPU's, and per-GPU figures are added."""
        timed = self.step_times[1:] or self.step_times
        tokens_per_s = statistics.mean(self.tokens_per_s[1:] or self.tokens_per_s) if self.tokens_per_s else None
        peaks = [peak for peak in [peak_memory_gib(), *self.peaks_per_gpu] if peak is not None]
        summary = {
            "train_seconds": self.train_seconds,
            "tokens_trained": self.tokens_seen_all_ranks,
            "median_step_time_s": statistics.median(timed) if timed else None,
            "tokens_per_s": tokens_per_s,
            "peak_gpu_memory_gib": max(peaks) if peaks else None,
        }
        ranks = distributed.world_size()
        if ranks > 1:
            summary.update(world_size=ranks, tokens_per_s_per_gpu=tokens_per_s and tokens_per_s / ranks,
                           peak_gpu_memory_gib_per_gpu=self.peaks_per_gpu)
        return summary


class StopOnRequest(TrainerCallback):
    """Ends training with a checkpoint after step `step` (--stop-after-step), or after the step in progress when the
    process gets SIGTERM (a preempted machine, a notebook's stop button) or Ctrl-C; a second one stops at once.
    `signal` holds the signal that asked, None when none did. With signals=False only --stop-after-step applies."""

    def __init__(self, step: int = 0, signals: bool = True):
        self.step = step
        self.signals = signals
        self.signal = None
        self._handlers = {}

    def _ask_to_stop(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint; again to stop at once",
              file=sys.stderr, flush=True)

    def on_train_begin(self, args, state, control, **kwargs):
        if self.signals and threading.current_thread() is threading.main_thread():
            self._handlers = {s: signal.signal(s, self._ask_to_stop) for s in (signal.SIGINT, signal.SIGTERM)}

    def on_train_end(self, args, state, control, **kwargs):
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)
        self._handlers = {}

    def on_step_end(self, args, state, control, **kwargs):
        # torchrun passes a signal to each rank in turn: the ranks stop after the same step, or one would wait forever
        # in the next step's gradient sync while another saves.
        signum = distributed.largest(self.signal or 0)
        if signum and self.signal is None:
            self.signal = signum
        if self.signal is not None or (self.step and state.global_step >= self.step):
            control.should_save = True
            control.should_training_stop = True


class ReadableProgress(ProgressCallback):
    """transformers' progress bar, with each training log as one short line above it instead of a dict of strings
    ({'loss': '6.891', 'grad_norm': '0.3945', ...} on every step); evaluations are MetricsRecorder's line."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs or "loss" not in logs:
            return
        parts = [f"loss {logs['loss']:.4f}"]
        if logs.get("grad_norm") is not None:
            parts.append(f"grad norm {logs['grad_norm']:.3g}")
        if logs.get("learning_rate") is not None:
            parts.append(f"lr {logs['learning_rate']:.3g}")
        self.training_bar.write(f"step {state.global_step}/{state.max_steps}: " + ", ".join(parts))


def readable_progress(trainer):
    """The trainer's progress bar swapped for ReadableProgress (none is added where the bar is switched off)."""
    if any(isinstance(callback, ProgressCallback) for callback in trainer.callback_handler.callbacks):
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(ReadableProgress)
