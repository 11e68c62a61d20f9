"""What every recipe does the same way, as one call each: `start` (flags, checks, GPUs, seed, run folder), the trainer's
arguments (`trainer_arguments`), `train` (batching, metrics, resume, a clean stop) and `finish` (adapter, manifest,
results, summary). A recipe keeps its card: the model, the LoRA, the data, what it measures and reports.

  session = start(RECIPE, Config, argv, SMOKE)   # nothing is loaded and no folder exists until every input checks out
  with session.folder:                            # a crash marks the folder FAILED; a user error leaves no folder
      ...                                         # load, LoRA, data: the recipe's own steps
      trainer = SFTTrainer(..., args=trainer_arguments(session, SFTConfig, eval_strategy="steps"))
      if not session.train(trainer):               # stopped: a checkpoint and STOPPED, resume with --resume
          return
      ...                                         # evaluate
      session.finish(model, tokenizer, trainer, data, results_markdown(...), best_eval_loss=...)
"""
import dataclasses
import os
import sys
import typing
from pathlib import Path

from transformers import set_seed

from common import distributed, record
from common.batching import check_token_budget, pass_budget, settle_batching
from common.callbacks import MetricsRecorder, StopOnRequest, readable_progress
from common.config import RunOptions, convert, parse, usage_name
from common.data import check_data_source
from common.errors import UserError
from common.hardware import Hardware, detect, precision_of, reset_peak_memory, training_precision_flags
from common.outputs import RunFolder, manifest, optimizer_that_ran
from common.report import loggers, print_summary


@dataclasses.dataclass
class Session:
    recipe: str
    cfg: object  # the recipe's Config, resolved
    run: RunOptions
    hardware: Hardware
    folder: RunFolder
    accumulation: int  # micro-batches this process accumulates a step: the card's, divided over the processes
    record: record.RunRecord
    report_to: list[str]
    recorder: MetricsRecorder | None = None
    batching: dict = dataclasses.field(default_factory=dict)  # how a step ran, for the manifest (set by train)

    @property
    def rows_a_pass(self) -> int:
        return self.cfg.per_device_train_batch_size

    def eval_losses(self) -> list[float]:
        """The eval losses a resumed run logged before its checkpoint (a moving average continues from them)."""
        return [r["eval_loss"] for r in self.folder.logged() if "eval_loss" in r]

    def log_to(self, name: str):
        """TensorBoard's events of the next trainer into tensorboard/<name>: one folder a training of a study."""
        if "tensorboard" in self.report_to:
            os.environ["TENSORBOARD_LOGGING_DIR"] = str(self.folder.path / "tensorboard" / name)

    @staticmethod
    def best_step(trainer) -> int:
        """The step of the checkpoint load_best_model_at_end restored; the last step when no evaluation ran."""
        best = trainer.state.best_model_checkpoint
        return int(Path(best).name.split("-")[1]) if best else trainer.state.global_step

    def train(self, trainer, folder: RunFolder | None = None, signals: bool = True) -> bool:
        """Train to the configured step: metrics into metrics.jsonl, a resumed run from its newest complete checkpoint,
        a step's rows in passes within --token-budget where the recipe has one; says once how a step runs. True when
        training finished; False when --stop-after-step or a signal stopped it (a checkpoint and STOPPED written).
        `folder`: a run of several trainings (a rank sweep) puts each in its own; `signals=False` leaves SIGTERM and
        Ctrl-C their default."""
        folder = folder or self.folder
        cfg = self.cfg
        budget = None
        if hasattr(cfg, "token_budget"):
            budget = pass_budget(cfg.token_budget, trainer.model, self.rows_a_pass, self.accumulation,
                                 cfg.max_seq_length, self.hardware.precision)
        self.batching = settle_batching(trainer, self.rows_a_pass, self.accumulation, budget)
        print(step_line(self.batching))
        self.recorder = MetricsRecorder(folder.metrics)
        stop = StopOnRequest(self.run.stop_after_step, signals=signals)
        trainer.add_callback(self.recorder)
        trainer.add_callback(stop)
        readable_progress(trainer)
        self.recorder.count_tokens_of(trainer)
        reset_peak_memory()
        trainer.train(resume_from_checkpoint=folder.last_checkpoint() if self.run.resume else None)
        if trainer.state.global_step < trainer.args.max_steps or stop.signal:
            folder.mark_stopped(trainer.state.global_step, self.recipe, stop.signal)
            return False
        return True

    def finish(self, model, tokenizer, trainer, data: dict, results: str, loss_curves: dict | None = None,
               save_adapter: bool = True, throughput: dict | None = None, **figures):
        """The end of every run, on rank 0: the adapter (unless the recipe saved its own), manifest.json, run.json with
        the adapter and the figures, results.md (last: it marks the run complete) and the summary in the terminal.
        `figures` are the recipe's own results (eval loss, macro-F1, ...): they go into the manifest and run.json."""
        if save_adapter:
            self.folder.save_adapter(model, tokenizer)
        throughput = throughput if throughput is not None else self.recorder.summary()
        what_ran = {"model": trained_model(self)}
        if trainer is not None:  # a study of several trainings passes what ran in `figures`
            what_ran.update(precision=precision_of(model), optimizer=optimizer_that_ran(trainer))
        self.folder.write_json("manifest.json", manifest(
            self.recipe, self.hardware, self.cfg.seed, data,
            **{"command": command_line(self), **self.batching, **what_ran, **throughput, **figures}))
        self.record.adapters = self.record.adapters or [
            record.Adapter("adapter", self.record.base_model, self.record.load_in_4bit)]
        self.record.metrics = {key: value for key, value in {**figures, **throughput}.items()
                               if isinstance(value, (int, float, str)) or value is None}
        self.record.write(self.folder.path)
        self.folder.write_results(results, loss_curves=loss_curves or {"": self.recorder.records})
        print_summary(self.recipe, self.folder.path, throughput, self.recorder.records if self.recorder else [])


def start(recipe: str, config_class, argv=None, smoke: dict | None = None, *, checks=(), chat_format: bool = True,
          one_process: str | None = None, system_prompt: str | None = None) -> Session:
    """Resolve and check everything a run needs, then join the GPUs, seed, and open the run folder with config.json and
    run.json. Every input a user gives is checked before the folder exists: the values (common.config), the recipe's
    own `checks` (each called with cfg and the run options), the data source (its file, its rows and, unless
    chat_format is False for a recipe that reads its own columns, a chat format), the logger's package, a --resume
    folder of this recipe, how the accumulation divides over the processes. `one_process` refuses torchrun with that
    reason."""
    cfg, run = parse(config_class, argv, smoke, recipe)
    if one_process:
        distributed.refuse(recipe, one_process)
    for check in checks:
        check(cfg, run)
    if getattr(cfg, "data", None):
        check_data_source(cfg.data, hub_config=getattr(cfg, "hub_config", None),
                          **({} if chat_format else {"expect": None}))
    if hasattr(cfg, "token_budget"):
        check_token_budget(cfg.token_budget, cfg.max_seq_length)
    report_to = loggers(run.report_to)
    accumulation = distributed.accumulation_per_rank(cfg.gradient_accumulation_steps, run.scale_batch, run.smoke)
    distributed.start()  # under torchrun (--gpus N): one process a GPU, rank 0 writes the run folder
    hardware = detect(run.precision)
    set_seed(cfg.seed)
    folder = RunFolder.reopen(run.resume) if run.resume else RunFolder.create(recipe, run.output_dir)
    if "tensorboard" in report_to:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(folder.path / "tensorboard")  # transformers 5 reads it from here
    card_model = getattr(config_class(), "model_name", "") or ""
    run_record = record.RunRecord(
        recipe=recipe, base_model=str(folder.smoke_base if run.smoke else cfg.model_name), card_model=card_model,
        smoke=run.smoke, load_in_4bit=getattr(cfg, "load_in_4bit", False),
        chat_template=getattr(cfg, "chat_template", None),
        system_prompt=system_prompt or getattr(cfg, "system_prompt", None) or None)
    if distributed.is_main():
        folder.write_config(cfg, run, recipe)
        run_record.write(folder.path)
    print(f"run folder: {folder.path}  ({hardware.describe()}, {distributed.processes_line()})")
    return Session(recipe, cfg, run, hardware, folder, accumulation, run_record, report_to)


def trainer_arguments(session: Session, config_class, **recipe_values):
    """The trainer's arguments (SFTConfig, or another TRL config class): the defaults every recipe shares, then each
    Config field that is also a field of `config_class` (learning_rate, warmup_steps, optim, ...), then what the recipe
    passes, then the user's trainer fields (flags and --config keys that are no recipe field, `--save-total-limit 3`),
    which win."""
    cfg = session.cfg
    fields = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(session.run.trainer_fields) - fields)
    if unknown:
        raise UserError(f"unknown flag --{unknown[0].replace('_', '-')}: not a field of {session.recipe} nor of "
                        f"{config_class.__name__}; run with --help to list the fields")
    values = {name: value for name, value in dataclasses.asdict(cfg).items() if name in fields}
    values.update(output_dir=str(session.folder.checkpoints), per_device_train_batch_size=session.rows_a_pass,
                  gradient_accumulation_steps=session.accumulation, logging_steps=1, data_seed=cfg.seed,
                  report_to=session.report_to, **training_precision_flags(session.hardware.precision))
    if "max_length" in fields and hasattr(cfg, "max_seq_length"):
        values["max_length"] = cfg.max_seq_length
    values.update(recipe_values)
    hints = typing.get_type_hints(config_class)
    for name, value in session.run.trainer_fields.items():
        values[name] = trainer_value(value, hints[name], name)
    try:
        return config_class(**values)
    except (TypeError, ValueError) as error:
        raise UserError(f"the trainer's arguments: {str(error).splitlines()[0]}") from None


def keep_best_by_eval_loss(cfg) -> dict:
    """Trainer arguments for a card that evaluates every eval_steps and keeps the checkpoint with the lowest eval loss:
    a checkpoint at each evaluation, the best and the latest kept (to restore the best, and to resume), the best
    loaded back when training ends."""
    return dict(eval_strategy="steps", save_steps=cfg.eval_steps, save_total_limit=2, load_best_model_at_end=True,
                metric_for_best_model="eval_loss")


def trainer_value(value, annotation, name: str):
    """A flag's text as the trainer's field type where that is a number or a switch (Optional too); other types (a
    scheduler name, a list of loggers) take the text as it is, as TRL's own parser does."""
    options = [a for a in typing.get_args(annotation) or (annotation,) if a is not type(None)]
    simple = [a for a in options if a in (bool, int, float)]
    if not isinstance(value, str) or len(simple) != len(options):
        return value
    return None if value.lower() in ("none", "null") else convert(value, simple[0], f"--{name.replace('_', '-')}")


def step_line(batching: dict) -> str:
    """How one optimizer step runs, as the trainer really gets it: printed once at start."""
    batch, budget = batching["batch"], batching.get("token_budget")
    line = (f"step: {batch['effective_batch']} rows = {batch['per_device_train_batch_size']} a pass x "
            f"{batch['gradient_accumulation_steps']} accumulation x {distributed.processes_line()}")
    if batching["batching"] == "token-budget":
        line += (f"; the trainer gets {batch['per_device_train_batch_size'] * batch['gradient_accumulation_steps']} "
                 f"rows at once, which Unsloth runs as passes of at most {budget['tokens_a_pass']:,} tokens")
    return line


def trained_model(session: Session) -> str:
    if session.run.smoke:
        return (f"{session.record.base_model}: a tiny random-init model of {session.record.card_model}'s "
                "architecture (--smoke), for checking the pipeline only")
    return session.record.base_model


def command_line(session: Session) -> str:
    """The command as typed: run.sh passes its own line; a direct start shows python -m."""
    return os.environ.get("FT_COMMAND") or " ".join([usage_name(session.recipe), *sys.argv[1:]])


def answer_prompts(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int) -> list[tuple[str, str]]:
    """(the last user message before the first reply, the model's greedy answer) for each conversation."""
    from unsloth import FastLanguageModel

    from common.chat import generate_reply
    FastLanguageModel.for_inference(model)
    answers = []
    for messages in conversations:
        prompt = messages[:next(i for i, m in enumerate(messages) if m["role"] == "assistant")]
        answers.append((prompt[-1]["content"], generate_reply(model, tokenizer, prompt, max_new_tokens)))
    return answers


def base_model(session: Session, smoke_family: str, smoke_rows) -> str:
    """The model to load: the recipe's model_name or, with --smoke, a tiny random-init model of `smoke_family`'s
    architecture whose tokenizer is trained on `smoke_rows()` (rank 0 builds it, the others find it)."""
    if not session.run.smoke:
        return session.cfg.model_name
    from common.smoke import tiny_model
    with distributed.main_first():
        return tiny_model(smoke_family, smoke_rows(), folder=session.folder.smoke_base)


