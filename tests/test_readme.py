"""The README's Python blocks run, in order, in one namespace, and print what they say.

A comment after a ``print(...)`` call on the same line is that call's output: the test checks
it, whitespace aside (numpy's arrays print over several lines; the README writes them on one).
"""

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)
SHOWN = re.compile(r"^(?P<indent>\s*)print\((?P<args>.*?)\)\s+# (?P<shown>.+)$")
MAX_LINES = 250
_SHOWN_CALLS: list[str] = []


def _blocks() -> list[str]:
    return BLOCK.findall(README.read_text(encoding="utf-8"))


def _checked(code: str) -> str:
    """``code`` with each ``print(args)  # shown`` made ``_shows("shown", args)``."""
    lines = []
    for line in code.splitlines():
        match = SHOWN.match(line)
        if match:
            line = f"{match['indent']}_shows({match['shown']!r}, {match['args']})"
        lines.append(line)
    return "\n".join(lines) + "\n"


def _shows(shown: str, *values) -> None:
    _SHOWN_CALLS.append(shown)
    buffer = io.StringIO()
    print(*values, file=buffer)
    printed = buffer.getvalue()
    assert printed.split() == shown.split(), f"the README shows {shown!r}; the code prints {printed!r}"


def test_the_readme_is_a_front_door():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_LINES, f"README.md has {lines} lines; keep it to {MAX_LINES} (move the rest to docs/)"


def test_every_python_block_runs_and_prints_what_it_shows():
    blocks = _blocks()
    assert blocks, "README.md has no ```python block"
    namespace = {"__name__": "readme", "_shows": _shows}
    _SHOWN_CALLS.clear()
    for number, block in enumerate(blocks, 1):
        code = compile(_checked(block), f"README.md, python block {number}", "exec")
        with contextlib.redirect_stderr(io.StringIO()):  # a progress bar is no failure here
            exec(code, namespace)
    shown = [m["shown"] for block in blocks for line in block.splitlines() if (m := SHOWN.match(line))]
    # an output shown under `except` is printed only if the error was raised
    assert _SHOWN_CALLS == shown, f"outputs the README shows but the code never printed: {set(shown) - set(_SHOWN_CALLS)}"
