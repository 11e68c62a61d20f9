"""An Ollama Modelfile whose TEMPLATE renders a conversation exactly as the run's chat template does.

Ollama templates are Go text/template, the run's is Jinja. Rather than keep a hand-written Go copy of each template,
the pieces are read off the tokenizer itself: each message is rendered with a marker as its content, and what stands
around the marker is that role's prefix and suffix (plus the generation prompt, and what a template puts first when
there is no system message, such as Llama 3.1's dated default). The pieces are then put back together for a longer
conversation and compared with the tokenizer's own rendering: a template that is not a plain sequence of turns is
refused rather than exported wrong. One difference remains by design: Llama 3's template strips spaces around a
message's text and Go's text/template has no function to do so, so Ollama keeps them.
"""
from dataclasses import dataclass

from common.chat import END_OF_TURN
from common.errors import UserError

MARK = {role: f"\u27e6{role}\u27e7" for role in ("system", "user1", "assistant1", "user2")}


@dataclass
class TurnPieces:
    system_prefix: str | None  # None: the template ignores system messages
    system_suffix: str
    opening_without_system: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    generation_prompt: str


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    bos = tokenizer.bos_token
    return text[len(bos):] if bos and text.startswith(bos) else text  # the GGUF's tokenizer adds BOS itself


def _split(text: str, *markers: str) -> list[str]:
    pieces = []
    for marker in markers:
        before, found, text = text.partition(marker)
        if not found:
            raise ValueError(marker)
        pieces.append(before)
    return pieces + [text]


def _drop_prefix(text: str, prefix: str) -> str:
    if not text.startswith(prefix):
        raise ValueError(prefix)
    return text[len(prefix):]


def _drop_suffix(text: str, suffix: str) -> str:
    if not text.endswith(suffix):
        raise ValueError(suffix)
    return text[:len(text) - len(suffix)]


def message(role: str, key: str) -> dict:
    return {"role": role, "content": MARK[key]}


def turn_pieces(tokenizer) -> TurnPieces:
    """The template's text around each role's content; UserError when the template is not a sequence of turns."""
    user1, assistant1, user2 = message("user", "user1"), message("assistant", "assistant1"), message("user", "user2")
    try:
        (user_suffix,) = _split(_render(tokenizer, [user1], False), MARK["user1"])[1:]
        (assistant_suffix,) = _split(_render(tokenizer, [user1, assistant1], False), MARK["user1"], MARK["assistant1"])[2:]
        opening, between_user_and_reply, between_reply_and_user, end = _split(
            _render(tokenizer, [user1, assistant1, user2], True), MARK["user1"], MARK["assistant1"], MARK["user2"])
        assistant_prefix = _drop_prefix(between_user_and_reply, user_suffix)
        user_prefix = _drop_prefix(between_reply_and_user, assistant_suffix)
        generation_prompt = _drop_prefix(end, user_suffix)
        with_system = _render(tokenizer, [message("system", "system"), user1], False)
        if MARK["system"] in with_system:
            system_prefix, rest = _split(with_system, MARK["system"])
            system_suffix = _drop_suffix(_split(rest, MARK["user1"])[0], user_prefix)
        else:
            system_prefix, system_suffix = None, ""
        pieces = TurnPieces(system_prefix, system_suffix, _drop_suffix(opening, user_prefix), user_prefix, user_suffix,
                            assistant_prefix, assistant_suffix, generation_prompt)
    except (ValueError, TypeError) as error:
        raise UserError(f"the run's chat template does not render as a plain sequence of turns ({error}); "
                        "no Modelfile TEMPLATE can be derived from it") from None
    check = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What is 2+2?"},
             {"role": "assistant", "content": "4"}, {"role": "user", "content": "Thanks"}]
    if compose(pieces, check) != _render(tokenizer, check, True):
        raise UserError("the run's chat template does not render as a plain sequence of turns; "
                        "no Modelfile TEMPLATE can be derived from it")
    return pieces


def compose(pieces: TurnPieces, messages: list[dict]) -> str:
    """What the Go template renders, in Python: the self-check above, and the reference for the Ollama test."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    text = (pieces.system_prefix + "\n\n".join(system) + pieces.system_suffix
            if system and pieces.system_prefix is not None else pieces.opening_without_system)
    turns = [m for m in messages if m["role"] != "system"]
    for index, turn in enumerate(turns):
        if turn["role"] == "user":
            text += pieces.user_prefix + turn["content"] + pieces.user_suffix
            text += pieces.generation_prompt if index == len(turns) - 1 else ""
        else:
            text += pieces.assistant_prefix + turn["content"] + pieces.assistant_suffix
    return text


def go_template(pieces: TurnPieces) -> str:
    """The same rendering as compose(), in Ollama's Go template language (system messages arrive as .System)."""
    for piece in vars(pieces).values():
        if piece and ("{{" in piece or '"""' in piece):
            raise UserError('the run\'s chat template contains "{{" or \'"""\'; it cannot go into a Modelfile TEMPLATE')
    system = (f"{{{{ if .System }}}}{pieces.system_prefix}{{{{ .System }}}}{pieces.system_suffix}"
              f"{{{{ else }}}}{pieces.opening_without_system}{{{{ end }}}}"
              if pieces.system_prefix is not None else pieces.opening_without_system)
    # Every "{{-" below trims only the line break that lays the template out (it follows a "}}"), never template text.
    return (f"{system}{{{{ range $i, $_ := .Messages }}}}\n"
            "{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
            f'{{{{- if eq .Role "user" }}}}{pieces.user_prefix}{{{{ .Content }}}}{pieces.user_suffix}'
            f"{{{{ if $last }}}}{pieces.generation_prompt}{{{{ end }}}}\n"
            f'{{{{- else if eq .Role "assistant" }}}}{pieces.assistant_prefix}{{{{ .Content }}}}{pieces.assistant_suffix}'
            "{{ end }}\n"
            "{{- end }}")


def stop_tokens(tokenizer, pieces: TurnPieces) -> list[str]:
    """The end-of-turn tokens the template writes after a reply, and the tokenizer's end of sequence."""
    stops = [token for token in END_OF_TURN if token in pieces.assistant_suffix]
    if tokenizer.eos_token and tokenizer.eos_token not in stops:
        stops.append(tokenizer.eos_token)
    return stops


def modelfile(gguf_name: str, tokenizer, system_prompt: str | None) -> str:
    """The Modelfile beside the GGUF: `ollama create NAME -f Modelfile` in that folder."""
    pieces = turn_pieces(tokenizer)
    lines = [f"FROM ./{gguf_name}", "", f'TEMPLATE """{go_template(pieces)}"""', ""]
    lines += [f'PARAMETER stop "{token}"' for token in stop_tokens(tokenizer, pieces)]
    if system_prompt:
        if '"""' in system_prompt:
            raise UserError('the run\'s system prompt contains \'"""\'; it cannot go into a Modelfile SYSTEM')
        lines += ["", f'SYSTEM """{system_prompt}"""']
    return "\n".join(lines) + "\n"
