"""Chat templates: jinja run in a sandbox, with limits on time and size.

A checkpoint's chat template is code its author wrote, run on every prompt. jinja's sandbox already stops it from
reaching Python's internals (no `__class__`, no `os`), and we configure it like transformers (trim_blocks,
lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII, a
`{% generation %}` tag rendered as-is). The sandbox does not stop a template from running forever
(`{% for i in range(100000) %}{% for j in range(100000) %}`) or from asking for ten gigabytes (`{{ 'A' * 10**10 }}`).
So every rendering gets a budget:

- steps: each loop iteration, call, filter, operator and concatenation counts one; a few hundred are typical;
- time: the clock is read at every step;
- size: the operators and calls that can make big things (`*`, `**`, `+`, `%`, `~`, format widths, numeric
  arguments such as `center(10**10)`) are checked *before* they run, and every result and the output after.

Anything over budget, and any error the template raises, ends in one msrnn error that says which template failed.
"""
from __future__ import annotations

import functools
import inspect
import json
import re
import threading
import time
from datetime import datetime

from .errors import CheckpointError, InputError

MAX_STEPS = 1_000_000  # a real chat template takes hundreds; a million takes about a second
MAX_SECONDS = 5.0
MIN_CHARS = 1_000_000  # the output may be this long plus 10x the conversation it renders
MAX_INT_BITS = 4096  # integers a template computes stay below 2^4096 (10 ** 10 ** 10 would take forever)
_BIG_WIDTH = re.compile(r"\d{7,}|\*")  # a width or precision of a million or more, or one taken from the arguments


class _Limit(Exception):
    """Raised inside a rendering that went over its budget (turned into an InputError by `render`)."""


class _Budget:
    def __init__(self, chars: int):
        self.deadline, self.steps, self.chars = time.monotonic() + MAX_SECONDS, MAX_STEPS, chars


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _refuse_huge_width(fmt: str, pattern: str) -> None:
    """Refuse a format string whose fields (`pattern` finds them) ask for a width of a million or more, or take
    one from the arguments (`*`): "%9999999999s" would allocate ten gigabytes in one C call."""
    if _BIG_WIDTH.search("".join(re.findall(pattern, fmt))):
        raise _Limit(f"its format string {fmt[:40]!r} asks for a huge width")


def _length(x) -> int:
    return len(x) if isinstance(x, (str, list, tuple, dict)) else 0


def _predicted_size(operator: str, left, right) -> int:
    """How long the result of `left operator right` will be (0 where it cannot be long), before it is computed."""
    if _is_int(left) and _is_int(right):
        bits = {"*": left.bit_length() + right.bit_length(),
                "**": right * left.bit_length() if abs(left) > 1 and right > 0 else 0}.get(operator, 0)
        if bits > MAX_INT_BITS:
            raise _Limit(f"it computes an integer of about {bits:,} bits (the limit is {MAX_INT_BITS:,})")
        return 0
    if operator == "*":
        seq, n = (left, right) if _is_int(right) else (right, left)
        return _length(seq) * n if _is_int(n) else 0
    if operator == "+":
        return _length(left) + _length(right)
    if operator == "%" and isinstance(left, str):
        _refuse_huge_width(left, r"%[^a-zA-Z%]*")
    return 0


def _predicted_call_size(name: str, a: dict) -> int:
    """How long the result of the string operations that multiply sizes will be, from their arguments `a` (named
    as jinja's filters name them), before they run; 0 for every other call (its result is checked afterwards)."""
    if name == "join":  # sep.join(items), items|join(sep)
        return _length(a.get("d")) * _length(a.get("value"))
    if name == "replace":  # every occurrence of old (or, for old == "", every gap) becomes new
        return (_length(a.get("s")) // max(_length(a.get("old")), 1) + 1) * _length(a.get("new"))
    if name == "indent":
        width = a.get("width", 4)
        return str(a.get("s", "")).count("\n") * (width if _is_int(width) else _length(width))
    if name == "wordwrap":
        return _length(a.get("s")) * (_length(a.get("wrapstring")) + 1)
    if name == "format" and isinstance(a.get("value"), str):  # "%10s"|format(x)
        _refuse_huge_width(a["value"], r"%[^a-zA-Z%]*")
    return 0


def _limited_environment():
    """The sandboxed environment class, with every operation that can loop or grow counted and checked."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class LimitedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+", "%"})  # these go through call_binop (and are not folded)

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.budget = threading.local()  # .current: the _Budget of the rendering under way in this thread

        def tick(self, size: int = 0) -> None:
            """One step; refuses to go on past the step or time budget, or to make something `size` long. Outside
            a rendering (jinja folding constants while compiling) every step refuses, so jinja leaves that
            work to the rendering, inside the budget."""
            budget = getattr(self.budget, "current", None)
            if budget is None:
                raise _Limit("not rendering")
            budget.steps -= 1
            if budget.steps < 0:
                raise _Limit(f"it took more than {MAX_STEPS:,} steps (loop iterations, calls, operators)")
            if time.monotonic() > budget.deadline:
                raise _Limit(f"it ran for more than {MAX_SECONDS:g} s")
            if size > budget.chars:
                raise _Limit(f"it asked for a value of size {size:,}; the limit for this conversation is "
                             f"{budget.chars:,} characters")

        def sized(self, value):
            """`value`, after checking its length (a result whose size could not be predicted)."""
            if isinstance(value, (str, list, tuple, dict)):
                self.tick(len(value))
            return value

        def call_binop(self, context, operator, left, right):
            self.tick(_predicted_size(operator, left, right))
            return self.sized(super().call_binop(context, operator, left, right))

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805: jinja's own signature
            __self.tick(_largest_int(args, kwargs))  # "x".ljust(10**10)
            owner = getattr(__obj, "__self__", None)
            if isinstance(owner, str) and args:  # sep.join(items), s.replace(old, new)
                named = {"join": {"d": owner, "value": args[0]},
                         "replace": {"s": owner, "old": args[0], "new": args[1:2] and args[1]}}
                __self.tick(_predicted_call_size(__obj.__name__, named.get(__obj.__name__, {})))
            return __self.sized(super().call(__context, __obj, *args, **kwargs))

        def wrap_str_format(self, value):
            """str.format with a width like {:>9999999999} would allocate before returning: refused up front."""
            fmt = getattr(value, "__self__", None)
            if isinstance(fmt, str):
                _refuse_huge_width(fmt, r"\{[^{}]*\}")
            return super().wrap_str_format(value)

        def bounded(self, iterable):
            """What every {% for %} loop iterates over (see `compile_template`): one step per item."""
            for item in iterable:
                self.tick()
                yield item

        def joined(self, *parts):
            """`a ~ b`: jinja's str_join, counted and checked."""
            self.tick(sum(len(p) for p in parts if isinstance(p, str)))
            return self.sized("".join(map(str, parts)))

    return LimitedSandbox


@functools.lru_cache(maxsize=16)
def compile_template(source: str):
    """The template compiled in a LimitedSandbox, rewritten so that every `{% for %}` iterates through
    `environment.bounded(...)` and every `~` becomes `environment.joined(...)`: a loop whose body calls nothing
    is otherwise invisible to the sandbox. Raises jinja2's TemplateSyntaxError."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.visitor import NodeTransformer

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    class Counted(NodeTransformer):
        def visit_For(self, node):
            node = self.generic_visit(node)
            node.iter = nodes.Call(nodes.EnvironmentAttribute("bounded"), [node.iter], [], None, None,
                                   lineno=node.lineno)
            return node

        def visit_Concat(self, node):
            node = self.generic_visit(node)
            return nodes.Call(nodes.EnvironmentAttribute("joined"), node.nodes, [], None, None, lineno=node.lineno)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = _limited_environment()(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.filters = {name: _counted(env, f) for name, f in env.filters.items()}  # filters are called directly
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(Counted().visit(env.parse(source)))


def _largest_int(args, kwargs) -> int:
    return max([abs(a) for a in (*args, *kwargs.values()) if _is_int(a)], default=0)


def _counted(env, f):
    """A filter that counts as a step and refuses huge numeric arguments (`center(10**10)`) and the few string
    operations that would multiply sizes (`join`, `replace`, `indent`, `wordwrap`, `format`) when too big."""
    signature = inspect.signature(f)
    name = f.__name__.removeprefix("do_")

    @functools.wraps(f)  # keeps jinja's pass_context / pass_environment marks
    def checked(*args, **kwargs):
        env.tick(_largest_int(args, kwargs))
        try:
            named = signature.bind(*args, **kwargs).arguments
        except TypeError:  # wrong arguments: let the filter itself say so
            named = {}
        env.tick(_predicted_call_size(name, named))
        return env.sized(f(*args, **kwargs))

    return checked


def render(source: str, where: str, **variables) -> str:
    """Render the chat template `source` (from `where`, for messages) with `variables`, within the budget.

    Errors: a syntax error, a sandbox refusal or a failure of the template's own code -> CheckpointError (the
    template is broken); `raise_exception(...)` in the template -> InputError with its message (the conversation
    is not one the template accepts); over budget -> InputError."""
    import jinja2

    try:
        template = compile_template(source)
    except jinja2.TemplateSyntaxError as e:
        raise CheckpointError(f"the chat template of {where} has a syntax error (line {e.lineno}: {e.message}); fix "
                              "the template, or format the prompt yourself.") from e
    conversation = sum(len(json.dumps(v, default=str)) for v in variables.values())
    env = template.environment
    env.budget.current = _Budget(MIN_CHARS + 10 * conversation)
    pieces, size = [], 0
    try:
        for piece in template.generate(**variables):
            size += len(piece)
            env.tick(size)
            pieces.append(piece)
    except _Limit as e:
        raise InputError(f"the chat template of {where} was stopped: {e}. The template (or the conversation) is "
                         "not a sane prompt format.") from e
    except jinja2.sandbox.SecurityError as e:
        raise CheckpointError(f"the chat template of {where} tried something the sandbox refuses ({e}); msrnn "
                              "will not run it.") from e
    except jinja2.TemplateError as e:  # raise_exception("...") and undefined variables
        raise InputError(f"the chat template of {where} refused the conversation: {e}") from e
    except Exception as e:  # the template's own code failed: 1/0, a missing key, deep recursion...
        raise CheckpointError(f"the chat template of {where} failed: {type(e).__name__}: {e}") from e
    finally:
        env.budget.current = None
    return "".join(pieces)
