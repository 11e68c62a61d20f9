"""What the benchmark measures: each recipe's row (its card's shape and the flags that keep evaluation out of the timed
steps) and the two data regimes. bench/benchmark.py runs them; bench/report.py lists its tables in this order."""
from dataclasses import dataclass, field

REGIMES = ("fixed", "chat")
NO_EVAL = 1_000_000  # an evaluation / checkpoint cadence past the last step: none during the timed run
AT_LAST_STEP = "at last step"  # replaced by the step count: for a recipe that needs one evaluation to keep a checkpoint


@dataclass(frozen=True)
class Bench:
    shape: str  # bench/shapes.py's name for the card's architecture (random-init weights)
    data_format: str  # what the recipe's --data reads: messages, text_label or alpaca
    steps: int  # optimizer steps a side: a few timed after warm-up, inside the time budget
    flags: dict = field(default_factory=dict)  # recipe fields set here: evaluation and generation cut to a minimum
    metrics: str = "metrics.jsonl"  # the recipe's MetricsRecorder file (a glob) inside its run folder
    gradient_checkpointing: bool = True  # as the recipe's get_peft_model sets it; the plain side does the same


# One row a recipe. Sequence length, batch, accumulation, LoRA and optimiser are read from the recipe's Config.
# token_budget="card": the reference sides run the card's rows a pass, so the recipe runs passes of at most that many
# tokens too and the memory columns compare like with like; `auto` (the default on a big GPU) trades memory for speed
# and has its own table (--token-budgets card,auto).
RECIPES = {
    "llama3_8b": Bench("llama-3-8b", "messages", 8,
                       dict(eval_steps=NO_EVAL, max_eval_samples=2, sample_prompts=0, token_budget="card")),
    "llama32_1b_mlp": Bench("llama-3.2-1b", "messages", 14,
                            dict(save_steps=NO_EVAL, held_out_questions=1, max_new_tokens=1, token_budget="card")),
    "tinyllama_sentiment": Bench("tinyllama-1.1b", "text_label", 14, dict(eval_steps=NO_EVAL, max_eval_samples=2,
                                                                        max_test_samples=0, generation_samples=0)),
    # 60: each new padded length (a multiple of 64, at most 8 under 512) costs its first step about 0.35 s once; over 10
    # timed steps those one-off costs weighed more than in the card's 200-step run (chat rows: 1.71x the plain script
    # over 10 timed steps, 2.29x over 55, on one H100). Steps take 0.1-0.3 s: 60 of them cost a side seconds.
    "gpt2_medium_qlora": Bench("gpt2-medium", "alpaca", 60,
                               dict(ranks=8, only="qlora", eval_prompts=2, max_new_tokens=1, max_samples=0),
                               metrics="metrics/qlora-r8.jsonl", gradient_checkpointing=False),
    "llama31_8b_qlora": Bench("llama-3.1-8b", "messages", 8,
                              dict(eval_steps=AT_LAST_STEP, max_eval_samples=2, sample_prompts=0, max_new_tokens=1,
                                   token_budget="card")),
}
