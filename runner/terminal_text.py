"""Text from outside the runner made inert before it reaches a terminal.

A commit message, a branch name, a build step's output or a log line read back from the daemon
is written by whoever controls the repository, the forge or the build. Printed raw, its escape
sequences act on the operator's terminal: `ESC]8;;URL` makes a link, `ESC]0;...` sets the
window title, `ESC[2J` clears the screen, a bare `\\r` lets the rest of the line overwrite what
the runner printed before it. `inert` is the one function every printer passes such text
through (`runner exec`'s terminal view, `runner logs`, `runner runs`), whether or not the output
is a terminal: a pipe often ends in one too (`| less -R`, `| tee`).

What it does:
- every escape sequence (CSI, including colours; OSC, DCS, SOS, PM, APC strings up to their
  terminator, or to the end of the text when there is none; the short ESC sequences), in its
  7-bit (ESC ...) or 8-bit (C1) form, is removed: the text around it stays, so a link keeps its
  words and loses its target, a coloured word keeps its letters;
- every other control character (C0, DEL, C1) is shown as a Python-style escape (`\\r`,
  `\\x07`, `\\x1b` for an ESC that starts no sequence), TAB excepted, and newline too where the
  caller allows several lines. A `\\r` is shown, not obeyed: a progress bar then reads as its
  successive states, and nothing hides what came before it on the line;
- the bidirectional embeddings, overrides and isolates (U+202A to U+202E, U+2066 to U+2069) are
  shown as `\\u202e` and so on: printed, they reorder what the operator reads ("Trojan Source":
  a file name or a command that reads otherwise than it is).

The runner's own colours are added by the printers after this, around already inert text, so
no colour of the untrusted text survives. Stored logs are not changed: this is for display.
"""
from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any

# One escape sequence, 7-bit or 8-bit. A string sequence (OSC, DCS, SOS, PM, APC) ends at ST
# (ESC \ or 0x9c) or BEL, or where another ESC starts (terminals abort it there), or at the end.
_SEQUENCE = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]?"  # CSI: parameters, intermediates, final byte
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"
    r"|\x1b[ -/]*[0-~]"  # the short ones: ESC c, ESC 7, ESC ( B, ESC # 8 ...
)
_BIDI = "\u202a-\u202e\u2066-\u2069"
_CONTROL = re.compile(f"[\\x00-\\x08\\x0a-\\x1f\\x7f-\\x9f{_BIDI}]")
_CONTROL_BUT_NEWLINE = re.compile(f"[\\x00-\\x08\\x0b-\\x1f\\x7f-\\x9f{_BIDI}]")
_NAMED = {"\n": "\\n", "\r": "\\r"}


def _visible(m: re.Match[str]) -> str:
    char = m.group()
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def inert(text: str, *, multiline: bool = False) -> str:
    """`text` with its escape sequences removed and its other control characters shown as
    escapes (TAB kept; newline kept when `multiline`, a CRLF taken as a newline then)."""
    control = _CONTROL_BUT_NEWLINE if multiline else _CONTROL
    if not control.search(text):
        return text  # nearly every line: nothing to do
    if multiline:
        text = text.replace("\r\n", "\n")
    return control.sub(_visible, _SEQUENCE.sub("", text))


def inert_all(value: Any, multiline_keys: Collection[str] = ()) -> Any:
    """`value` (an event, an API answer: dicts, lists, strings) with every string made inert;
    the strings under a key in `multiline_keys` (an error, a reason) may keep their newlines."""
    if isinstance(value, str):
        return inert(value)
    if isinstance(value, dict):
        # Flat string values inline: the terminal view walks every event of a run this way.
        return {k: (inert(v, multiline=k in multiline_keys) if isinstance(v, str)
                    else inert_all(v, multiline_keys) if isinstance(v, (dict, list, tuple))
                    else v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [inert_all(v, multiline_keys) for v in value]
    return value
