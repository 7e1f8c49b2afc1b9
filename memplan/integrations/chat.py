"""Chat rows through the tokenizer's chat template, as transformers' apply_chat_template renders them (jinja2's
ImmutableSandboxedEnvironment with trim_blocks / lstrip_blocks and loopcontrols, `raise_exception`, `tojson`,
`strftime_now`; transformers 5.24 utils/chat_template_utils.py), and fast enough for a million rows.

Most templates insert each message's content verbatim between text that depends only on the roles. For those,
a conversation is rendered once per role sequence with marked stand-in contents (`_Probe`), and every later one
with that role sequence is the same text with its contents put in place (`Chat.skeletons`): a string join instead
of a template run. A template that looks at a content (trims it, tests it, measures it, escapes it, slices it:
any use but output and concatenation) is seen doing so by the stand-ins and is rendered in full, row by row, as
are messages with keys beyond role and content (tool calls, names). Checked, not assumed: the first row of each
role sequence and rows 1, 2, 4, 8, ... are also rendered in full; a difference raises `SkeletonMismatch`, and the
caller reads the file again with every row rendered in full.
"""
from __future__ import annotations

import json
import re
import time
from typing import ClassVar

from memplan.errors import MemplanError

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
         "tool": "tool", "function_call": "assistant", "observation": "tool"}
MARK = re.compile("\ue000(\\d+)\ue001")  # a stand-in content: private-use characters around its message index


class SkeletonMismatch(Exception):
    """A row rendered from its role sequence's skeleton differs from the template's own rendering."""


def compile_template(template: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, **kw):
        if _has_probe(x):
            _Probe.used.append("tojson")
        return json.dumps(x, ensure_ascii=False, **{k: v for k, v in kw.items() if k in ("indent", "sort_keys")})

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateError as e:
        raise MemplanError(f"the tokenizer's chat template does not compile: {e}") from None


def messages(value) -> list[dict]:
    """A row's messages as the template reads them: role/content dicts (ShareGPT's from/value mapped)."""
    if all(type(m) is dict and "role" in m and m.get("content") is not None for m in value):
        return value  # already what the template reads (it cannot change them: immutable sandbox)
    out = []
    for m in value:
        if not isinstance(m, dict):
            raise MemplanError(f"a chat message must be an object, got {type(m).__name__}")
        if "role" in m:
            out.append({**m, "content": m.get("content") if m.get("content") is not None else ""})
        elif "from" in m:  # ShareGPT
            out.append({"role": ROLES.get(m["from"], m["from"]), "content": m.get("value") or ""})
        else:
            raise MemplanError(f"a chat message needs role/content or from/value, got {', '.join(m)}")
    return out


class Chat:
    """`Template.render(messages=..., add_generation_prompt=False, **special)` for many conversations."""

    def __init__(self, source: str, special: dict, skeletons: bool = True):
        self.template = t = compile_template(source)
        self.vars = {"add_generation_prompt": False, **{k: v for k, v in special.items() if v}}
        self.base = {**dict(t.globals), **self.vars}
        self.direct: bool | None = None  # the context built here equals render()'s: decided on the first chat
        self.skeletons: dict | None = {} if skeletons else None  # role sequence -> parts, or None (render it)
        self.rows = 0

    def __call__(self, value: list) -> str:
        """The text of one row's messages (as read from the file: role/content or ShareGPT from/value)."""
        self.rows += 1
        shape = _shape(value) if self.skeletons is not None else None
        if shape is None:
            return self.render(messages(value))
        fill = self.skeletons.get(shape, False)
        first = fill is False
        if first:
            fill = self.skeletons[shape] = self._skeleton(value)
        if fill is None:
            return self.render(value)
        text = fill(value)
        if first or self.rows & (self.rows - 1) == 0:
            want = self.render(value)
            if want != text:
                raise SkeletonMismatch(f"row {self.rows}")
        return text

    def render(self, msgs) -> str:
        """The template run on one conversation. render()'s own setup (jinja2 3.1 runtime.new_context copies the
        template globals, a ChainMap, into every context) is most of a short render: the same context is built
        here from one flat copy, checked against render() on the first chat."""
        if self.direct is None:
            want = self.template.render(messages=msgs, **self.vars)
            try:
                self.direct = self._render(msgs) == want
            except Exception:  # noqa: BLE001 - another jinja2 version's internals: render() it is
                self.direct = False
            return want
        return self._render(msgs) if self.direct else self.template.render(messages=msgs, **self.vars)

    def _render(self, msgs) -> str:
        t = self.template
        parent = self.base.copy()
        parent["messages"] = msgs
        ctx = t.environment.context_class(t.environment, parent, t.name, t.blocks)
        return "".join(t.root_render_func(ctx))

    def _skeleton(self, msgs):
        """A function of the messages giving the template's text for this role sequence (the contents put in the
        places the stand-ins marked), or None when the template does anything with a content but output it."""
        probes = [{"role": m["role"], "content": _Probe(f"\ue000{i}\ue001")} for i, m in enumerate(msgs)]
        _Probe.used = []
        try:
            text = self.render(probes)
        except Exception:  # noqa: BLE001 - a template that cannot take the stand-ins is rendered in full
            return None
        finally:
            used, _Probe.used = _Probe.used, []
        if used:
            return None
        parts = MARK.split(text)
        if any("\ue000" in p or "\ue001" in p for p in parts[::2]):
            return None
        # one str.format call per row: the text around the contents, braces doubled; {0[i][content]} for each
        return "".join(p.replace("{", "{{").replace("}", "}}") if k % 2 == 0 else f"{{0[{p}][content]}}"
                       for k, p in enumerate(parts)).format


def _shape(msgs) -> tuple | None:
    """The role sequence, when every message is exactly {role, content} with string content."""
    try:
        roles = tuple([m["role"] for m in msgs])
        if all([len(m) == 2 and type(m["content"]) is str for m in msgs]) and all(  # noqa: C419 - lists are
                [type(r) is str for r in roles]):  # noqa: C419 - faster than generators for a few messages
            return roles
    except (KeyError, TypeError, IndexError):
        pass
    return None


def _has_probe(x) -> bool:
    if isinstance(x, _Probe):
        return True
    if isinstance(x, dict):
        return any(_has_probe(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return any(_has_probe(v) for v in x)
    return False


# str methods and operators that output a content unchanged: str() (the template's output), concatenation (+;
# the result stays a _Probe so that what is done to it next is seen too)
_PASS = {"__class__", "__str__", "__add__", "__radd__", "__dict__", "__reduce_ex__", "__reduce__"}


class _Probe(str):
    """A stand-in content that records every use of itself other than being output or concatenated."""

    used: ClassVar[list] = []

    def __str__(self):
        return self

    def __add__(self, other):
        if not isinstance(other, str):
            return NotImplemented
        return _Probe(str.__add__(self, other))

    def __radd__(self, other):
        if not isinstance(other, str):
            return NotImplemented
        return _Probe(str.__add__(other, self))

    def __getattribute__(self, name):
        if name not in _PASS:
            _Probe.used.append(name)
        return str.__getattribute__(self, name)

    def _use(name):  # builds the recording operators below
        def op(self, *args):
            _Probe.used.append(name)
            return getattr(str, name)(self, *args)
        return op

    for _name in ("__len__", "__contains__", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__",
                  "__getitem__", "__iter__", "__mod__", "__rmod__", "__mul__", "__rmul__", "__format__",
                  "__repr__", "__hash__"):
        locals()[_name] = _use(_name)
    del _name, _use

    def __bool__(self):
        _Probe.used.append("__bool__")
        return True
