"""`lmx chat`: talk to a model from the terminal.

- `lmx chat -m MODEL "prompt"`: one answer, streamed to stdout, then exit
  (for scripts; `--json` prints the whole answer as one JSON object).
- `lmx chat -m MODEL`: a multi-turn conversation. On a terminal it prompts
  `you>` and streams each answer; `/reset` forgets the history, `/exit` (or
  Ctrl-D) quits, Ctrl-C stops the answer being written. With stdin piped,
  every line is one user turn of the same conversation.

Answers go to stdout; prompts and per-answer statistics (tokens, speed,
time to first token) go to stderr, so stdout stays the model's text.
`MODEL` may be a model id, a routing alias or `preset:NAME`; without `-m`
the first loaded model is used.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass
from typing import Any

from rich.markup import escape

from lmx_gateway.cli.http import (
    EXIT_FAILED,
    EXIT_OK,
    ApiError,
    LmxClient,
    add_common_options,
)
from lmx_gateway.cli.output import Output, error_line, run_command

PROMPT = "you> "
HELP = "/exit or Ctrl-D quits, /reset clears the conversation, Ctrl-C stops an answer"


@dataclass
class Turn:
    content: str
    finish_reason: str | None
    usage: dict[str, Any] | None
    ttft: float | None
    seconds: float
    interrupted: bool = False


def pick_model(client: LmxClient) -> str:
    body = client.get("/v1/models")
    data = body.get("data") or []
    if not data:
        raise ApiError(503, "no model is loaded; load one with `lmx models load NAME`",
                       "no-model-loaded")
    return str(data[0]["id"])


class Chat:
    def __init__(self, args: argparse.Namespace, client: LmxClient, out: Output,
                 model: str) -> None:
        self.args = args
        self.client = client
        self.out = out
        self.model = model
        self.served_by = model  # the id the server answered with (aliases resolve)
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = ([{"role": "system", "content": self.args.system}]
                         if self.args.system else [])

    def _body(self, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": self.messages,
                                "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        if self.args.max_tokens is not None:
            body["max_tokens"] = self.args.max_tokens
        if self.args.temperature is not None:
            body["temperature"] = self.args.temperature
        return body

    def ask(self, text: str, echo: bool = True) -> Turn:
        """One user turn: streamed to stdout (if `echo`), kept in the history."""
        self.messages.append({"role": "user", "content": text})
        try:
            turn = self._stream(echo)
        except BaseException:
            self.messages.pop()  # a failed turn leaves no half-conversation behind
            raise
        self.messages.append({"role": "assistant", "content": turn.content})
        return turn

    def _stream(self, echo: bool) -> Turn:
        parts: list[str] = []
        started = time.monotonic()
        first: float | None = None
        finish: str | None = None
        usage: dict[str, Any] | None = None
        interrupted = False
        with self.client.stream("POST", "/v1/chat/completions", self._body(True),
                                read_timeout=self.args.timeout) as events:
            try:
                for event in events:
                    if event.data.strip() == "[DONE]":
                        break
                    chunk = event.json()
                    if "error" in chunk:
                        err = chunk["error"]
                        raise ApiError(0, str(err.get("message")), err.get("code"))
                    if chunk.get("model"):
                        self.served_by = str(chunk["model"])
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or []:
                        piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            first = first or time.monotonic()
                            parts.append(piece)
                            if echo:
                                sys.stdout.write(piece)
                                sys.stdout.flush()
                        finish = choice.get("finish_reason") or finish
            except KeyboardInterrupt:
                interrupted = True  # leaving the `with` closes the stream: the server aborts
        if echo:
            sys.stdout.write("\n")
            sys.stdout.flush()
        return Turn("".join(parts), finish, usage, None if first is None else first - started,
                    time.monotonic() - started, interrupted)

    def stats(self, turn: Turn) -> str:
        bits = [self.served_by]
        if turn.usage:
            bits.append(f"{turn.usage.get('prompt_tokens')} prompt + "
                        f"{turn.usage.get('completion_tokens')} completion tokens")
            gen = turn.seconds - (turn.ttft or 0)
            completion = turn.usage.get("completion_tokens") or 0
            if gen > 0 and completion:
                bits.append(f"{completion / gen:.1f} tok/s")
        if turn.ttft is not None:
            bits.append(f"first token {turn.ttft * 1000:.0f} ms")
        if turn.finish_reason == "length":
            bits.append("cut at max_tokens")
        if turn.interrupted:
            bits.append("interrupted")
        return "[" + " · ".join(bits) + "]"


def _one_shot_json(chat: Chat, prompt: str) -> int:
    chat.messages.append({"role": "user", "content": prompt})
    body = chat.client.post("/v1/chat/completions", chat._body(False),
                            timeout=chat.args.timeout)
    choice = (body.get("choices") or [{}])[0]
    chat.out.json({"model": body.get("model"),
                   "content": (choice.get("message") or {}).get("content"),
                   "finish_reason": choice.get("finish_reason"), "usage": body.get("usage")})
    return EXIT_OK


def _read_line(out: Output, interactive: bool) -> str | None:
    if not interactive:
        line = sys.stdin.readline()
        return None if line == "" else line.rstrip("\n")
    try:
        return out.err.input(f"[bold cyan]{PROMPT}[/]")
    except EOFError:
        out.err.print()
        return None


def _conversation(chat: Chat, out: Output) -> int:
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
        out.err.print(f"Chatting with [bold]{escape(chat.model)}[/] at {escape(chat.client.url)}"
                      f"  [dim]({HELP})[/]")
    status = EXIT_OK
    while True:
        try:
            line = _read_line(out, interactive)
        except KeyboardInterrupt:
            out.err.print()
            return status
        if line is None:
            return status
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/q"):
            return status
        if text == "/reset":
            chat.reset()
            out.note("(conversation cleared)")
            continue
        if text == "/help":
            out.note(HELP)
            continue
        try:
            turn = chat.ask(text)
        except ApiError as exc:  # one failed turn does not end the conversation
            error_line(exc.one_line())
            status = EXIT_FAILED
            continue
        except KeyboardInterrupt:  # before the first token: the turn is dropped
            out.note("(interrupted)")
            continue
        out.note(chat.stats(turn))


def chat_command(args: argparse.Namespace, client: LmxClient, out: Output) -> int:
    model = args.model or pick_model(client)
    chat = Chat(args, client, out, model)
    prompt = " ".join(args.prompt).strip()
    if prompt == "-":
        prompt = sys.stdin.read().strip()
    if not prompt:
        if out.as_json:
            error_line("--json needs a prompt argument (one-shot mode)")
            return EXIT_FAILED
        return _conversation(chat, out)
    if out.as_json:
        return _one_shot_json(chat, prompt)
    turn = chat.ask(prompt)
    if not args.quiet:
        out.note(chat.stats(turn))
    return EXIT_OK


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("chat", help="chat with a model (interactive, or one-shot with a prompt)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_options(p, timeout=300.0)
    p.add_argument("prompt", nargs="*", help="one-shot prompt ('-' reads it from stdin)")
    p.add_argument("-m", "--model", help="model id, alias or preset:NAME "
                                         "(default: the first loaded model)")
    p.add_argument("-s", "--system", help="system prompt")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("-q", "--quiet", action="store_true", help="no statistics line (one-shot)")
    p.set_defaults(func=run_command, client_command=chat_command)
