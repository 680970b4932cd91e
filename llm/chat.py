"""``llm chat``: talk to an instruction-tuned checkpoint in the Alpaca format ``llm sft`` trains on.

    llm chat                                   # out/sft/ckpt.pt
    llm chat --checkpoint out/sft/ckpt.pt --temperature 0 --max-new-tokens 256
    llm chat --hf-dir gpt2-medium-sft/

How a conversation becomes one prompt (:func:`build_prompt`).  ``llm sft`` trains on single
records, each ``format_input(record) + format_response(record)`` followed by the end-of-text token
(``instruct.collate`` appends it).  A conversation is laid out exactly as those records would sit
side by side in a packed training sequence: every earlier turn is a complete record (its message as
the instruction, no input section, the model's reply as the output) closed by ``<|endoftext|>``,
and the new message is the prompt of one more record, ending in the response header, which is what
``llm sft`` itself generates its test responses from.  A first turn is therefore exactly the
training prompt.  The ``/system`` line, when set, comes first, followed by a blank line.

The reply streams as it is generated and ends at the end-of-text token, at the start of a new
template section ("\\n\\n### ", where the model would begin a turn of its own), or after
``--max-new-tokens``.  When the prompt plus ``--max-new-tokens`` would not fit the model's context
(``block_size``), the oldest turns are dropped, with a notice; if even the new message alone does
not fit, it is not sent (a notice says by how much it is too long) and the conversation is kept.

Commands: ``/help``, ``/reset`` (forget the conversation, keep the system line), ``/system TEXT``
(set the system line; ``/system`` alone shows it, ``/system -`` clears it), ``/quit``;
``//text`` sends "/text".  Ctrl-D (end of input) leaves.  Ctrl-C during a reply stops it; the
interrupted turn (message and partial reply) is left out of the history, as if it had not been
sent (turns dropped to make room for it stay too).  Ctrl-C at the prompt prints a notice and a new
prompt; a second one in a row leaves.  User text is encoded as the generator encodes prompts, so a literal "<|endoftext|>" typed in a
message is the end-of-text token.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator, Sequence

from .finetune.instruct import PREAMBLE, RESPONSE_HEADER, format_input, format_response

__all__ = ["build_prompt", "fit_history", "stop_marker", "cut_at_stop", "Chat", "add_chat_args", "run_chat"]

DEFAULT_CHECKPOINT = os.path.join("out", "sft", "ckpt.pt")
USER_PROMPT, MODEL_PREFIX = "you> ", "model> "
HELP = """commands:
  /reset         forget the conversation (the system line stays)
  /system TEXT   set the line placed before the conversation; /system alone shows it, /system - clears it
  /quit          leave (so do Ctrl-D and two Ctrl-C in a row at the prompt)
  /help          this list
  //text         send "/text" as a message
Ctrl-C during a reply stops it (the interrupted turn is not kept)."""

Turn = tuple[str, str]  # (user message, model reply)


def _record(message: str, reply: str = "") -> dict:
    return {"instruction": message, "input": "", "output": reply}


def build_prompt(history: Sequence[Turn], message: str, system: str = "", eot: str = "<|endoftext|>") -> str:
    """The text the model continues: [system + blank line] + earlier turns as training records, each
    closed by ``eot``, + the Alpaca prompt of ``message`` and the response header (see the module
    docstring).  Pure: the same arguments always give the same string."""
    parts = [f"{system}\n\n"] if system else []
    parts += [format_input(_record(m, r)) + format_response(_record(m, r)) + eot for m, r in history]
    parts.append(format_input(_record(message)) + RESPONSE_HEADER)
    return "".join(parts)


def stop_marker() -> str:
    """Where a reply ends if the model starts a new template section by itself: the common start of
    the instruction and response headers ("\\n\\n### "), derived from the template, not copied."""
    instruction_header = format_input(_record(""))[len(PREAMBLE):]
    return os.path.commonprefix([instruction_header, RESPONSE_HEADER])


def cut_at_stop(text: str, marker: str) -> str:
    """``text`` up to the first ``marker`` (all of it when there is none)."""
    i = text.find(marker)
    return text if i < 0 else text[:i]


def fit_history(history: Sequence[Turn], message: str, system: str, eot: str, count: Callable[[str], int],
                block_size: int, max_new_tokens: int) -> tuple[list[Turn], int, int]:
    """(kept turns, number dropped, prompt tokens): the oldest turns are dropped until the prompt plus
    ``max_new_tokens`` fits ``block_size``; with no turn left the prompt may still be too long (the
    caller checks the returned token count).  ``count`` is the number of tokens of a text."""
    kept = list(history)
    n = count(build_prompt(kept, message, system, eot))
    dropped = 0
    while kept and n + max_new_tokens > block_size:
        kept.pop(0)
        dropped += 1
        n = count(build_prompt(kept, message, system, eot))
    return kept, dropped, n


def _held_back(text: str, marker: str) -> int:
    """How many trailing characters of ``text`` could be the start of ``marker`` (not yet shown)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def _until_marker(pieces: Iterator[str], marker: str) -> Iterator[str]:
    """The pieces of a stream cut before ``marker``; text that may begin it is held back until it
    is clearly not the marker, so no part of the marker is ever printed."""
    text, shown = "", 0
    for piece in pieces:
        text += piece
        cut = text.find(marker)
        if cut >= 0:
            if cut > shown:
                yield text[shown:cut]
            return
        safe = len(text) - _held_back(text, marker)
        if safe > shown:
            yield text[shown:safe]
            shown = safe
    if len(text) > shown:
        yield text[shown:]


class Chat:
    """The conversation and the model behind it; :meth:`handle` takes one typed line."""

    def __init__(self, model, tokenizer, max_new_tokens: int, out=None, **sampling):
        from .generate import _default_eos

        self.model, self.tokenizer, self.max_new_tokens, self.sampling = model, tokenizer, max_new_tokens, sampling
        self.out = out or sys.stdout
        eos = _default_eos(tokenizer)
        self.eot = tokenizer.decode([eos]) if eos is not None else ""
        self.block_size = model.config.block_size
        self.history: list[Turn] = []
        self.system = ""
        self.marker = stop_marker()

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def handle(self, line: str) -> bool:
        """Act on one line of input; False when the user asked to leave."""
        line = line.strip()
        if not line:
            return True
        if line.startswith("/") and not line.startswith("//"):
            return self.command(line)
        self.reply(line[1:] if line.startswith("//") else line)
        return True

    def command(self, line: str) -> bool:
        name, _, rest = line.partition(" ")
        rest = rest.strip()
        if name in ("/quit", "/exit"):
            return False
        if name == "/help":
            self.say(HELP)
        elif name == "/reset":
            self.history.clear()
            self.say("[conversation cleared]")
        elif name == "/system" and not rest:
            self.say(f"[system: {self.system}]" if self.system else "[no system line; set one with /system TEXT]")
        elif name == "/system":
            self.system = "" if rest == "-" else rest
            self.say(f"[system set: {self.system}]" if self.system else "[system line cleared]")
        else:
            self.say(f"[unknown command {name}; /help lists the commands]")
        return True

    def reply(self, message: str) -> str | None:
        """Generate, stream and remember the reply to ``message``; None when it was not (fully) made."""
        from .generate import stream_text

        alone = self.count(build_prompt([], message, self.system, self.eot))
        if alone >= self.block_size:
            self.say(f"[message not sent: with the template it is {alone} tokens and the context holds "
                     f"{self.block_size}; shorten it (or the /system line)]")
            return None
        kept, dropped, n = fit_history(self.history, message, self.system, self.eot, self.count, self.block_size,
                                       self.max_new_tokens)
        if dropped:
            turns = "turn" if dropped == 1 else f"{dropped} turns"
            self.say(f"[dropped the oldest {turns} to fit the {self.block_size}-token context]")
        budget = min(self.max_new_tokens, self.block_size - n)
        if budget < self.max_new_tokens:
            self.say(f"[reply limited to {budget} tokens by the {self.block_size}-token context]")
        prompt = build_prompt(kept, message, self.system, self.eot)
        pieces = stream_text(self.model, self.tokenizer, prompt, budget, **self.sampling)
        text = ""
        self.out.write(MODEL_PREFIX)
        self.out.flush()
        try:
            for piece in _until_marker(pieces, self.marker):
                text += piece
                self.out.write(piece)
                self.out.flush()
        except KeyboardInterrupt:
            self.say("\n[interrupted: reply stopped, this turn is not kept]")
            return None
        finally:
            pieces.close()
        self.say("")
        self.history = kept + [(message, text)]  # (an interrupted turn leaves the history as it was)
        return text


def _own_ctrl_c() -> None:
    """Ctrl-C must stop a reply even when ``llm chat`` was started by a process that ignores or blocks
    SIGINT, which children inherit (``nohup``, a background job of a non-interactive shell): a Python started with
    SIGINT ignored never raises KeyboardInterrupt."""
    import signal

    signal.signal(signal.SIGINT, signal.default_int_handler)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _read_line(interrupted: bool) -> tuple[str | None, bool]:
    """(line or None to leave, whether this read was interrupted by Ctrl-C)."""
    try:
        return input(USER_PROMPT), False
    except EOFError:
        print(flush=True)
        return None, False
    except KeyboardInterrupt:
        if interrupted:
            print(flush=True)
            return None, True
        print("\n[Ctrl-C again or Ctrl-D to leave, /help for commands]", flush=True)
        return "", True


def add_chat_args(p: argparse.ArgumentParser) -> None:
    """``llm generate``'s model and sampling flags (one definition of them), with chat's defaults."""
    from .cli import add_generate_args

    add_generate_args(p)
    p.set_defaults(checkpoint=DEFAULT_CHECKPOINT)
    for action in p._actions:
        if action.dest == "prompt":
            action.help = "a message to send before reading the keyboard; repeat for several turns"


def run_chat(args: argparse.Namespace) -> int:
    import torch

    from .cli import _load_for_generate
    from .generate import _check_sampling_args
    from .tokenizer import check_vocab_fits, get_tokenizer
    from .train.train_setup import resolve_device

    try:
        import readline  # noqa: F401  (input() gains line editing and history)
    except ImportError:
        pass
    _own_ctrl_c()
    top_k = args.top_k or None
    _check_sampling_args(args.temperature, top_k, args.top_p)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    device = resolve_device(args.device)
    model, _, trained_with = _load_for_generate(args, device)
    tokenizer = get_tokenizer(args.tokenizer or trained_with)
    check_vocab_fits(model.config.vocab_size, tokenizer)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    chat = Chat(model, tokenizer, args.max_new_tokens, temperature=args.temperature, top_k=top_k,
                top_p=args.top_p, use_cache=args.use_cache, generator=gen)
    source = args.hf_dir or args.checkpoint
    print(f"[chatting with {source}: {model.config.block_size}-token context; /help for commands, "
          "/quit or Ctrl-D to leave]", flush=True)
    for message in args.prompt or []:
        print(USER_PROMPT + message, flush=True)
        chat.handle(message)
    interrupted = False
    while True:
        line, interrupted = _read_line(interrupted)
        try:
            if line is None or not chat.handle(line):
                return 0
        except KeyboardInterrupt:  # outside the reply's own handler (while encoding, say): the same
            print("\n[interrupted]", flush=True)
