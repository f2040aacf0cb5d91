"""The terminal chatbot behind `llmkit chat`: history, system prompt, streaming answers, slash commands.

Notable choices:
- The whole conversation is re-rendered with the model's chat template each turn; the engine's prefix reuse
  makes that cost only the new tokens (the answer's line shows how many were cached).
- Input and output are plain text streams (stdin/stdout by default), so the chat is testable by piping lines.
- The caller resolves the sampling settings (flags > the model's defaults > the loop guard of
  llmkit.generate.defaults.interactive_defaults: repetition penalty 1.1 over the last 64 tokens, 512 tokens
  at most); the banner prints them (the window as repetition_window), /temp changes the temperature.
"""

from __future__ import annotations

import json
import os
import sys
from typing import TextIO

from llmkit.errors import LlmkitError
from llmkit.generate.defaults import FIELDS, describe
from llmkit.generate.sampling import SamplingParams

HELP = """commands:
  /reset          forget the conversation (keeps the system prompt)
  /system TEXT    set the system prompt (and reset); /system alone removes it
  /temp X         set the sampling temperature (0 = greedy)
  /save FILE      write the conversation as JSON
  /help           this help
  /quit           leave (or Ctrl-D)"""


class ChatSession:
    def __init__(self, llm, params: SamplingParams, system: str | None = None):
        self.llm = llm
        self.params = params.validate()
        self.system = system
        self.history: list[dict] = []

    def messages(self) -> list[dict]:
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        return sys_msg + self.history

    def command(self, line: str, out: TextIO) -> bool:
        """Run a slash command; return False to quit."""
        name, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        if name in ("quit", "exit", "q"):
            return False
        if name == "reset":
            self.history.clear()
            print("(conversation reset)", file=out)
        elif name == "system":
            self.system, self.history = (arg or None), []
            print(f"(system prompt {'set' if arg else 'removed'}; conversation reset)", file=out)
        elif name == "temp":
            try:
                self.params = self.params.replace(temperature=float(arg)).validate()
            except (ValueError, LlmkitError) as e:
                print(f"(bad temperature {arg!r}: {e})", file=out)
            else:
                print(f"(temperature {self.params.temperature})", file=out)
        elif name == "save":
            if not arg:
                print("(usage: /save FILE)", file=out)
            else:
                tmp = arg + ".part"
                with open(tmp, "w", encoding="utf-8") as f:
                    json.dump(self.messages(), f, ensure_ascii=False, indent=2)
                os.replace(tmp, arg)
                print(f"(saved {len(self.messages())} messages to {arg})", file=out)
        elif name == "help":
            print(HELP, file=out)
        else:
            print(f"(unknown command /{name}; /help lists them)", file=out)
        return True

    def answer(self, text: str, out: TextIO) -> str:
        """Stream the reply to `text` to `out`, add both to the history, print the speed line."""
        self.history.append({"role": "user", "content": text})
        s = self.llm.stream(self.messages(), params=self.params)
        for delta in s:
            out.write(delta)
            out.flush()
        res = s.result
        self.history.append({"role": "assistant", "content": res.text})
        t = res.timings
        print(f"\n[{res.usage['completion_tokens']} tokens, {t['decode_tokens_per_s']:.1f} tok/s, "
              f"prompt {res.usage['prompt_tokens']} ({res.usage['cached_tokens']} cached) in "
              f"{t['prefill_s']:.2f} s]", file=out)
        return res.text


def run_chat(llm, params: SamplingParams, system: str | None = None, inp: TextIO | None = None,
             out: TextIO | None = None) -> int:
    inp = inp if inp is not None else sys.stdin  # read at call time: a replaced sys.stdin is honoured
    out = out if out is not None else sys.stdout
    from llmkit.tokenizer.chat import render_chat

    # a base model without a chat template fails here, in one line, before the banner promises a chat
    render_chat(llm.tokenizer, [{"role": "user", "content": "hi"}], add_generation_prompt=True)
    session = ChatSession(llm, params, system)
    tty = inp.isatty()
    print(f"llmkit chat with {llm.name} — /help for commands, /quit to leave", file=out)
    print(f"(sampling: {describe({k: getattr(session.params, k) for k in FIELDS})})", file=out)
    while True:
        if tty:
            out.write("> ")
            out.flush()
        line = inp.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not session.command(line, out):
                break
            continue
        session.answer(line, out)
    return 0
