"""The tool-call formats without a model: detection from template sources,
prompt preparation, the grammars llguidance compiles, and the incremental
parser (fed whole and character by character, which must agree)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from lmx_gateway.inference.tool_calls import (
    ArgumentsDelta,
    CallStart,
    ContentDelta,
    ToolCallParser,
    parse_tool_calls,
)
from lmx_protocol import ChatMessage, Generate, SamplingParams
from lmx_worker.text.chat_request import chat_prompt, request_grammar
from lmx_worker.text.chat_template import ChatTemplate
from lmx_worker.text.constraints import check_grammar, lark_grammar
from lmx_worker.text.tool_format import ToolFormat, ToolSupport, call_grammar, inspect_template

pytestmark = pytest.mark.timeout(60)

TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}},
    {"type": "function", "function": {"name": "g"}},
]

# Minimal templates in the style of each family (not the real ones).
HERMES_TEMPLATE = (
    "{% if tools %}<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>{% endif %}"
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.arguments | tojson }}"
    "</tool_call>{% endfor %}{% endfor %}")
MISTRAL_TEMPLATE = (
    "{% for m in messages %}{% if m.tool_calls %}[TOOL_CALLS]{% for c in m.tool_calls %}"
    "{{ c.id }}{% endfor %}{% elif m.role == 'tool' %}[TOOL_RESULTS]{{ m.tool_call_id }}"
    "{% else %}{{ m.content }}{% endif %}{% endfor %}{{ tools | length if tools else '' }}")
LLAMA3_TEMPLATE = ('{% if tools %}Respond as {"name": ..., "parameters": ...}{% endif %}'
                   "{% for m in messages %}{{ m.content }}<|eot_id|>{% endfor %}")
PLAIN_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
                  "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}"
                  "<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize(("source", "fmt", "takes_tools"), [
    (HERMES_TEMPLATE, ToolFormat.HERMES, True),
    (MISTRAL_TEMPLATE, ToolFormat.MISTRAL, True),
    (LLAMA3_TEMPLATE, ToolFormat.LLAMA3_JSON, True),
    ("{{ tools }}{% for m in messages %}{{ m.content }}{% endfor %}", ToolFormat.JSON, True),
    (PLAIN_TEMPLATE, ToolFormat.HERMES, False),
])
def test_format_detection(source: str, fmt: ToolFormat, takes_tools: bool) -> None:
    support = inspect_template(source)
    assert support.format is fmt
    assert support.takes_tools is takes_tools


def _generate(messages: list[ChatMessage], **extra: Any) -> Generate:
    return Generate("r", SamplingParams(), messages=messages, tools=json.dumps(TOOLS), **extra)


HISTORY = [
    ChatMessage("user", "hi"),
    ChatMessage("assistant", None, tool_calls=[{
        "id": "call_abc", "type": "function",
        "function": {"name": "f", "arguments": '{"x": 1}'}}]),
    ChatMessage("tool", '{"result": 2}', tool_call_id="call_abc"),
    ChatMessage("tool", '{"result": 3}', tool_call_id="call_def"),
]


def test_prompt_for_template_without_tools() -> None:
    prompt = chat_prompt(ChatTemplate(PLAIN_TEMPLATE, "", ""), _generate(HISTORY))
    # Tools described in a system prompt, calls and results inlined as text.
    assert prompt.startswith("<|im_start|>system\nYou can call functions.")
    assert '"name": "f"' in prompt
    assert '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>' in prompt
    assert ('<|im_start|>user\n<tool_response>\n{"result": 2}\n</tool_response>\n'
            '<tool_response>\n{"result": 3}\n</tool_response><|im_end|>') in prompt
    assert "<|im_start|>tool" not in prompt


def test_prompt_for_templates_with_tools() -> None:
    prompt = chat_prompt(ChatTemplate(HERMES_TEMPLATE, "", ""), _generate(HISTORY))
    assert prompt.startswith("<tools>")
    # Arguments reach the template as a mapping, not a JSON string.
    assert '<tool_call>{"x": 1}</tool_call>' in prompt
    mistral = chat_prompt(ChatTemplate(MISTRAL_TEMPLATE, "", ""), _generate(HISTORY))
    ids = mistral.split("[TOOL_CALLS]")[1]
    # Mistral's templates insist on 9-character ids, the same for call and result.
    assert ids[:9].isalnum() and f"[TOOL_RESULTS]{ids[:9]}" in mistral


@pytest.mark.parametrize("support", [
    ToolSupport(ToolFormat.HERMES, False),
    ToolSupport(ToolFormat.MISTRAL, True),
    ToolSupport(ToolFormat.MISTRAL, True, mistral_args=True),
    ToolSupport(ToolFormat.LLAMA3_JSON, True),
    ToolSupport(ToolFormat.JSON, True),
])
@pytest.mark.parametrize("parallel", [True, False])
def test_call_grammars_compile(support: ToolSupport, parallel: bool) -> None:
    check_grammar(lark_grammar(call_grammar(TOOLS, support, parallel)))
    check_grammar(lark_grammar(call_grammar(TOOLS, support, parallel,
                                            answer_schema={"type": "object"})))


def test_grammar_choice() -> None:
    support = ToolSupport(ToolFormat.HERMES, False)
    plain = Generate("r", SamplingParams(), messages=HISTORY[:1])
    assert request_grammar(plain, support, lambda _t: None) is None
    named = _generate(HISTORY[:1], tool_choice="named", tool_name="f")
    grammar = request_grammar(named, support, lambda _t: None)
    assert grammar is not None and '"const":"f"' in grammar.replace(" ", "")
    assert '"const":"g"' not in grammar.replace(" ", "")
    auto = _generate(HISTORY[:1])
    assert request_grammar(auto, support, lambda _t: None) is None


# (format, text, expected content, expected [(name, arguments)])
PARSE_CASES: list[tuple[str, str, str | None, list[tuple[str, Any]]]] = [
    ("hermes", 'Sure.\n<tool_call>\n{"name": "f", "arguments": {"x": [1, {"y": "}"}]}}\n'
     '</tool_call>\n<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>',
     "Sure.", [("f", {"x": [1, {"y": "}"}]}), ("g", {})]),
    ("hermes", '<tool_call>\n{"arguments": {"x": 1}, "name": "f"}\n</tool_call>',
     None, [("f", {"x": 1})]),
    ("hermes", '<tool_call>[{"name": "f", "arguments": "{\\"x\\": 2}"}]</tool_call>',
     None, [("f", {"x": 2})]),
    ("hermes", "a <tool_ca b <tool_call> not json </tool_call> c",
     "a <tool_ca b <tool_call> not json </tool_call> c", []),
    ("hermes", "no calls at all", "no calls at all", []),
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {"x": 1}}, '
     '{"name": "g", "arguments": {}}]', None, [("f", {"x": 1}), ("g", {})]),
    ("mistral", '[TOOL_CALLS]f[ARGS]{"x": 1}[TOOL_CALLS]g[ARGS]{}', None,
     [("f", {"x": 1}), ("g", {})]),
    ("llama3_json", '{"name": "f", "parameters": {"x": 1}}; {"name": "g", "parameters": {}}',
     None, [("f", {"x": 1}), ("g", {})]),
    ("llama3_json", '<|python_tag|>{"name": "f", "parameters": {"x": 3}}', None,
     [("f", {"x": 3})]),
    ("llama3_json", '{"name": "Bob", "age": 3}', '{"name": "Bob", "age": 3}', []),
    ("json", '[{"name": "f", "arguments": {"x": 1}}]', None, [("f", {"x": 1})]),
    ("json", '{"name": "nobody", "arguments": {}}', '{"name": "nobody", "arguments": {}}', []),
    ("json", 'text first {"name": "f", "arguments": {}}',
     'text first {"name": "f", "arguments": {}}', []),
]


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), PARSE_CASES)
def test_parser(fmt: str, text: str, content: str | None,
                calls: list[tuple[str, Any]]) -> None:
    names = ["f", "g"]
    whole_content, whole_calls = parse_tool_calls(text, fmt, names)
    assert whole_content == content
    assert [(c.name, json.loads(c.arguments)) for c in whole_calls] == calls
    parser = ToolCallParser(fmt, names)
    events = [e for ch in text for e in parser.feed(ch)] + parser.finish()
    streamed = "".join(e.text for e in events if isinstance(e, ContentDelta))
    assert streamed == (content or "")
    started = [e for e in events if isinstance(e, CallStart)]
    assert [e.name for e in started] == [name for name, _ in calls]
    for event in started:
        pieces = [e.text for e in events
                  if isinstance(e, ArgumentsDelta) and e.index == event.index]
        assert json.loads("".join(pieces)) == calls[event.index][1]
        # Name and id come before any argument piece.
        assert events.index(event) < min(
            (i for i, e in enumerate(events)
             if isinstance(e, ArgumentsDelta) and e.index == event.index), default=10**9)


def test_parser_holds_back_marker_prefixes() -> None:
    parser = ToolCallParser("hermes")
    assert parser.feed("Hello <tool") == [ContentDelta("Hello")]
    assert parser.feed("_c") == []
    # A call is reported once complete (so a client never sees half of one).
    assert parser.feed('all>{"name": "f", "arguments": {"x"') == []
    events = parser.feed(": 1}}</tool_call>")
    # Still in the pieces the text came in.
    assert [type(e) for e in events] == [CallStart, ArgumentsDelta, ArgumentsDelta]
    assert "".join(e.text for e in events if isinstance(e, ArgumentsDelta)) == '{"x": 1}'
    assert parser.finish() == []


CALL_F = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n'


def _streamed(text: str, fmt: str = "hermes") -> tuple[ToolCallParser, list[Any]]:
    parser = ToolCallParser(fmt, ["f", "g"])
    return parser, [e for ch in text for e in parser.feed(ch)] + parser.finish()


def test_repeated_call_ends_the_turn() -> None:
    """Greedy decoding under a `required` grammar repeats one call until
    max_tokens: the repeat is dropped, the turn ends there."""
    text = (CALL_F + '<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>\n'
            + '<tool_call>\n{"arguments": {"x": 1}, "name": "f"}\n</tool_call>\n' + CALL_F
            + '<tool_call>\n{"name": "g", "arguments": {"y"')
    content, calls = parse_tool_calls(text, "hermes", ["f", "g"])
    assert content is None
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"x": 1}), ("g", {})]
    parser, events = _streamed(text)
    assert parser.ended
    assert [e.name for e in events if isinstance(e, CallStart)] == ["f", "g"]
    assert parser.feed(CALL_F) == []  # the rest of the output is ignored


def test_call_cut_short_is_never_reported() -> None:
    text = CALL_F + '<tool_call>\n{"name": "g", "arguments": {"y": [1, 2'
    content, calls = parse_tool_calls(text, "hermes", ["f", "g"])
    assert content is None and [c.name for c in calls] == ["f"]
    parser, events = _streamed(text)
    assert not parser.ended
    assert [e.name for e in events if isinstance(e, CallStart)] == ["f"]
    assert all(e.index == 0 for e in events if isinstance(e, ArgumentsDelta))
    only_cut = parse_tool_calls('<tool_call>{"name": "f", "arguments": {"x', "hermes", ["f"])
    assert only_cut == ("", [])
