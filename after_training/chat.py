"""./run.sh chat RUN_DIR: talk to a trained model in its own chat template.

Loads the run's base model and adapter as trained (4-bit on a GPU), applies the run's chat template and system prompt,
streams each reply and stops at the template's end-of-turn token. The conversation is kept between turns; /reset
clears it, /exit (or Ctrl-D) leaves. --prompt "TEXT" answers once and exits; --base answers without the adapter.
"""
import contextlib
import sys

with contextlib.redirect_stdout(sys.stderr):  # Unsloth's banner aside: stdout carries only the replies
    import unsloth  # noqa: F401  (first: Unsloth patches transformers and PEFT on import)


import torch
from transformers import TextStreamer

from after_training.arguments import chat_arguments
from after_training.trained_run import load_trained, open_run
from common.chat import stop_token_ids
from common.errors import UserError, run_main
from common.hardware import detect


@torch.no_grad()
def reply(model, tokenizer, messages: list[dict], max_new_tokens: int, temperature: float, base: bool,
          max_seq_length: int) -> str:
    """Stream the model's next turn to stdout and return it. The oldest exchanges are left out of the prompt when the
    conversation no longer fits max_seq_length with room for the reply; a message longer than the model's context is
    refused."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    while True:
        encoded = tokenizer.apply_chat_template(system + turns, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)
        if encoded["input_ids"].shape[1] + max_new_tokens <= max_seq_length or len(turns) <= 1:
            break
        turns = turns[2:]
    context = model.config.max_position_embeddings  # past it a model with learned positions (GPT-2) cannot go
    if encoded["input_ids"].shape[1] + max_new_tokens > context:
        raise UserError(f"the message is {encoded['input_ids'].shape[1]:,} tokens with the template; with "
                        f"--max-new-tokens {max_new_tokens} it does not fit the model's {context:,}-token context: "
                        "shorten it or lower --max-new-tokens")
    encoded = encoded.to(model.device)
    sampling = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
    without_adapter = model.disable_adapter() if base else contextlib.nullcontext()
    with without_adapter:
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, eos_token_id=stop_token_ids(tokenizer),
                                pad_token_id=tokenizer.pad_token_id, streamer=TextStreamer(tokenizer, skip_prompt=True,
                                                                                           skip_special_tokens=True),
                                **sampling)
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def main(argv=None):
    args = chat_arguments(sys.argv[1:] if argv is None else argv)
    run = open_run(args.run_dir, args.adapter)
    hardware = detect(args.precision)
    with contextlib.redirect_stdout(sys.stderr):  # loading banners aside: stdout carries only the replies
        model, tokenizer = load_trained(run, hardware.precision)
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{run.adapter}: the tokenizer has no chat template; this run cannot be chatted with")
    system_prompt = run.system_prompt if args.system is None else args.system
    opening = [{"role": "system", "content": system_prompt}] if system_prompt else []
    answer = lambda messages: reply(model, tokenizer, messages, args.max_new_tokens, args.temperature, args.base,
                                    run.max_seq_length)
    if args.prompt is not None:
        answer(opening + [{"role": "user", "content": args.prompt}])
        return

    which = "the base model, no adapter" if args.base else f"adapter {run.adapter}"
    print(f"chatting with {run.recipe} ({which}{', tiny smoke model' if run.smoke else ''}); "
          f"/reset clears the conversation, /exit or Ctrl-D leaves, Ctrl-C stops a reply")
    converse(answer, opening)


def converse(answer, opening: list[dict], read=input):
    """The interactive loop: each line is a user turn answered with the conversation so far. A reply stopped with
    Ctrl-C, or a message too long to answer, leaves the conversation as it was before that message."""
    messages = list(opening)
    while True:
        try:
            text = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if text == "/exit":
            return
        if text == "/reset":
            messages = list(opening)
            print("(conversation cleared)")
            continue
        if not text:
            continue
        print("model> ", end="", flush=True)
        asked = messages + [{"role": "user", "content": text}]
        try:
            messages = asked + [{"role": "assistant", "content": answer(asked)}]
        except KeyboardInterrupt:
            print("\n(reply stopped; the conversation goes on without that message)")
        except UserError as error:
            print(f"\n({error})")


if __name__ == "__main__":
    run_main(main, interrupted="interrupted")
