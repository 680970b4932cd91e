"""llm chat: the prompt built from a conversation, and the program driven through a pseudo-terminal.

The terminal tests run ``python -m llm chat`` on a tiny random checkpoint in a pty (so readline,
the tty's Ctrl-C and Ctrl-D are the real ones), type lines, and read the screen up to the next
prompt, each read under a timeout so that a hang fails the test instead of blocking it.
"""
import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import torch

from llm.chat import _until_marker, build_prompt, cut_at_stop, fit_history, stop_marker
from llm.train.checkpoint import FORMAT, atomic_save, load_model
from llm.generate import generate_text
from llm.finetune.instruct import EOT, InstructionDataset, prompt_ids
from llm.model import GPT, GPTConfig
from llm.tokenizer import get_tokenizer

ROOT = Path(__file__).resolve().parents[1]
HISTORY = [("What is the capital of France?", "Paris."), ("And of Italy?", "Rome.\n")]


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer("gpt2")


# ------------------------------------------------------------------------------ the prompt


def test_first_turn_is_the_sft_prompt(tok):
    entry = {"instruction": "Name a color.", "input": "", "output": ""}
    assert build_prompt([], "Name a color.") == tok.decode(prompt_ids(entry, tok))
    assert tok.encode(build_prompt([], "Name a color.")) == prompt_ids(entry, tok)


def test_earlier_turns_are_training_records_closed_by_eot(tok):
    records = [{"instruction": m, "input": "", "output": r} for m, r in HISTORY]
    ds = InstructionDataset(records, tok)  # the ids llm sft trains on (collate appends EOT)
    fresh = tok.decode(prompt_ids({"instruction": "Name a color.", "input": "", "output": ""}, tok))
    expected = "".join(tok.decode(ids + [EOT]) for ids, _ in ds.items) + fresh
    assert build_prompt(HISTORY, "Name a color.") == expected
    assert build_prompt(HISTORY, "Name a color.", system="Be brief.") == "Be brief.\n\n" + expected
    assert tok.encode(expected).count(EOT) == 2  # the separators are the real end-of-text token
    assert build_prompt(HISTORY, "x") == build_prompt(HISTORY, "x")  # pure


def test_fit_history_drops_the_oldest_turns_first():
    count = len  # characters as tokens: easy to reason about
    full = len(build_prompt(HISTORY, "hi"))
    kept, dropped, n = fit_history(HISTORY, "hi", "", "<eot>", count, full + 10, 10)
    assert (kept, dropped) == (HISTORY, 0) and n == len(build_prompt(HISTORY, "hi", eot="<eot>"))
    one = len(build_prompt(HISTORY[1:], "hi", eot="<eot>"))
    kept, dropped, n = fit_history(HISTORY, "hi", "", "<eot>", count, one + 10, 10)
    assert (kept, dropped, n) == (HISTORY[1:], 1, one)
    kept, dropped, n = fit_history(HISTORY, "hi", "", "<eot>", count, 5, 10)  # nothing fits
    assert (kept, dropped, n) == ([], 2, len(build_prompt([], "hi")))


def test_stop_marker_cuts_replies_and_is_never_printed():
    marker = stop_marker()
    assert marker == "\n\n### " and cut_at_stop("ok\n\n### Instruction:\nmore", marker) == "ok"
    assert list(_until_marker(iter(["ab\n", "\n#", "## x"]), marker)) == ["ab"]
    pieces = ["a\n", "\n", "#", "# not", " it\n\n"]  # near misses are released, none lost
    assert "".join(_until_marker(iter(pieces), marker)) == "".join(pieces)


# ------------------------------------------------------------------------------ the program in a pty

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]")


def _checkpoint(path: Path, block_size: int) -> Path:
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", block_size=block_size))
    with torch.no_grad():  # larger weights than at init: replies that depend on the prompt, not blank lines
        for p in model.parameters():
            p.normal_(0, 0.3)
    atomic_save({"format": FORMAT, "model": model.state_dict(), "model_config": model.config.to_dict()}, path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("chat") / "ckpt.pt", 128)


class Terminal:
    """``llm chat`` on the slave side of a pty; ``expect`` reads the screen up to a string."""

    def __init__(self, *args: str, sigint=signal.SIG_DFL):
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 400, 0, 0))  # no line wrapping
        attrs = termios.tcgetattr(slave)
        attrs[1] &= ~termios.OPOST  # output as written: "\n", not "\r\n"
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        env = {**os.environ, "TERM": "dumb", "OMP_NUM_THREADS": "1", "INPUTRC": "/dev/null"}

        def controlling_tty():  # after setsid (start_new_session): make the pty this session's terminal
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
            # and SIGINT as a shell gives it (or, to test that chat takes it back, ignored, as nohup leaves it)
            signal.signal(signal.SIGINT, sigint)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

        self.proc = subprocess.Popen([sys.executable, "-m", "llm", "chat", *args], cwd=ROOT, env=env, stdin=slave,
                                     stdout=slave, stderr=slave, start_new_session=True,
                                     preexec_fn=controlling_tty)
        os.close(slave)
        self.fd, self.screen, self.pos = master, "", 0

    def expect(self, text: str, timeout: float = 30.0) -> str:
        """Everything shown since the last expect, through ``text``; fails after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while (i := self.screen.find(text, self.pos)) < 0:
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(left):
                pytest.fail(f"no {text!r} on the screen within {timeout} s; it shows:\n{self.screen[self.pos:]}")
        seen, self.pos = self.screen[self.pos:i + len(text)], i + len(text)
        return seen

    def _read(self, timeout: float) -> bool:
        if not select.select([self.fd], [], [], timeout)[0]:
            return False
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the program has exited and closed the terminal
            return False
        self.screen = ANSI.sub("", (self.screen + data.decode("utf-8", "replace")))
        return bool(data)

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def say(self, message: str) -> str:
        """Type a message; the reply as shown after "model> " (the prompt must be on screen)."""
        self.send(message + "\n")
        self.expect("model> ")
        return self.expect("\nyou> ")[:-len("\nyou> ")]

    def exit_code(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"llm chat did not exit; the screen shows:\n{self.screen[self.pos:]}")
        finally:
            os.close(self.fd)


def _greedy(model, tok, history, message, system="", n=8) -> str:
    prompt = build_prompt(history, message, system, tok.decode([EOT]))
    return cut_at_stop(generate_text(model, tok, prompt, n, temperature=0)[0], stop_marker())


def test_conversation_system_reset_trimming_and_quit(ckpt, tok):
    model = load_model(ckpt)
    term = Terminal("--checkpoint", str(ckpt), "--temperature", "0", "--max-new-tokens", "8", "--device", "cpu")
    assert "128-token context" in term.expect("you> ")
    m1, m2, m3, m4 = "What is the capital of France?", "Name a color.", "Tell me a joke.", "Write a haiku about the sea."
    r1 = term.say(m1)
    assert r1 == _greedy(model, tok, [], m1) and r1.strip()  # greedy: what generate gives the same prompt
    r2 = term.say(m2)  # the first turn still fits: it is context
    assert r2 == _greedy(model, tok, [(m1, r1)], m2) != _greedy(model, tok, [], m2)
    term.send("/system Be brief.\n")
    assert "[system set: Be brief.]" in term.expect("you> ")
    term.send("/system\n")
    assert "[system: Be brief.]" in term.expect("you> ")
    term.send(f"{m3}\n")  # three turns do not fit 128 tokens: the oldest goes, with a notice
    shown = term.expect("\nyou> ")
    assert "[dropped the oldest turn to fit the 128-token context]" in shown
    r3 = shown.split("model> ", 1)[1][:-len("\nyou> ")]
    assert r3 == _greedy(model, tok, [(m2, r2)], m3, "Be brief.") != _greedy(model, tok, [(m2, r2)], m3)
    term.send("/system -\n")
    term.expect("you> ")
    term.send("/reset\n")
    assert "[conversation cleared]" in term.expect("you> ")
    r4 = term.say(m4)  # after /reset: exactly a fresh first turn
    assert r4 == _greedy(model, tok, [], m4)
    assert r4 not in (_greedy(model, tok, [(m3, r3)], m4), _greedy(model, tok, [(m2, r2), (m3, r3)], m4))
    term.send(" ".join(["word"] * 120) + "\n")  # longer than the context by itself
    assert "[message not sent: with the template it is" in term.expect("you> ")
    assert term.say(m1) == _greedy(model, tok, [(m4, r4)], m1)  # the conversation was kept
    term.send("/help\n")
    assert "/reset" in term.expect("you> ")
    term.send("/quit\n")
    assert term.exit_code() == 0


@pytest.mark.parametrize("sigint", [signal.SIG_DFL, signal.SIG_IGN], ids=["default", "inherited-ignored"])
def test_ctrl_c_stops_a_reply_and_twice_at_the_prompt_leaves(tmp_path, sigint):
    ckpt = _checkpoint(tmp_path / "long.pt", 1024)
    term = Terminal("--checkpoint", str(ckpt), "--temperature", "0", "--max-new-tokens", "900", "--no-cache",
                    "--device", "cpu", sigint=sigint)
    term.expect("you> ")
    for message in ("Tell me a long story.", "Another one."):
        term.send(message + "\n")
        term.expect("model> ")
        term.expect(" ")  # the reply is streaming (900 uncached tokens take seconds)
        term.send("\x03")
        assert "[interrupted: reply stopped" in term.expect("you> ")
    # readline shows "you> " a moment before it waits for input, and a ^C in between is caught but not acted
    # on until the next key (CPython's readline checks for signals only when its select() is interrupted):
    # on a loaded machine the test hit that window.  A person is never that fast; wait as one would.
    time.sleep(0.5)
    term.send("\x03")
    assert "[Ctrl-C again or Ctrl-D to leave" in term.expect("you> ")
    time.sleep(0.5)
    term.send("\x03")
    assert term.exit_code() == 0


def test_end_of_input_leaves_with_0(ckpt, tok):
    term = Terminal("--checkpoint", str(ckpt), "--temperature", "0", "--max-new-tokens", "4")
    term.expect("you> ")
    assert term.say("Hi.") == _greedy(load_model(ckpt), tok, [], "Hi.", n=4)
    term.send("\x04")  # Ctrl-D on an empty line
    assert term.exit_code() == 0


def test_piped_input(ckpt):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "llm", "chat", "--checkpoint", str(ckpt), "--prompt", "Hi.",
                           "--max-new-tokens", "2"], cwd=ROOT, env=env, input="/reset\n", capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "you> Hi.\nmodel> " in done.stdout and "[conversation cleared]" in done.stdout


def test_bad_flags_are_one_error_line(ckpt, capsys):
    from llm.cli import main

    assert main(["chat", "--checkpoint", str(ckpt), "--temperature", "-1"]) == 2
    assert "error: temperature must be" in capsys.readouterr().err
    assert main(["chat", "--checkpoint", str(ckpt.parent / "nope.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_an_interrupted_reply_is_not_kept(monkeypatch, tok):
    import io

    import llm.generate
    from llm.chat import Chat

    def interrupted(*args, **kwargs):
        yield "partial"
        raise KeyboardInterrupt

    monkeypatch.setattr(llm.generate, "stream_text", interrupted)
    out = io.StringIO()
    chat = Chat(GPT(GPTConfig.from_preset("tiny")), tok, 8, out=out, temperature=0)
    chat.history = [("before", "kept")]
    assert chat.reply("Hi.") is None and chat.history == [("before", "kept")]
    assert "model> partial\n[interrupted: reply stopped, this turn is not kept]" in out.getvalue()
