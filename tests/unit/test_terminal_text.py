"""runner.terminal_text.inert, the one filter between untrusted text (commit messages, branch
names, build output, log lines read back) and a terminal: hostile inputs and what is left."""
from __future__ import annotations

import pytest

from runner.terminal_text import inert, inert_all

ESC = "\x1b"

CASES = [
    # (input, single line, multiline)
    ("plain text, unicode é ✓", "plain text, unicode é ✓", "plain text, unicode é ✓"),
    ("a\tb", "a\tb", "a\tb"),
    # OSC 8 link, ST- and BEL-terminated: the words stay, the target goes
    (f"{ESC}]8;;javascript:alert(1){ESC}\\click{ESC}]8;;{ESC}\\", "click", "click"),
    (f"{ESC}]8;;https://evil.example/\x07here{ESC}]8;;\x07", "here", "here"),
    # window title, screen clear, cursor moves, colours, private modes
    (f"x{ESC}]0;pwned\x07y", "xy", "xy"),
    (f"x{ESC}]2;pwned{ESC}\\y", "xy", "xy"),
    (f"a{ESC}[2Jb{ESC}[Hc{ESC}[3;7Hd", "abcd", "abcd"),
    (f"{ESC}[31mred{ESC}[0m {ESC}[1;38;5;208mbold{ESC}[m", "red bold", "red bold"),
    (f"a{ESC}[?1049hb{ESC}[?25l", "ab", "ab"),
    # DCS, APC, PM, SOS strings; short sequences (reset, save cursor, charset, DECALN)
    (f"a{ESC}P1$qm{ESC}\\b{ESC}_apc{ESC}\\c{ESC}^pm{ESC}\\d{ESC}Xsos{ESC}\\e", "abcde", "abcde"),
    (f"a{ESC}cb{ESC}7c{ESC}(Bd{ESC}#8e", "abcde", "abcde"),
    # 8-bit (C1) forms: CSI, OSC ... ST
    ("a\x9b2Jb\x9d0;title\x9cc\x90dcs\x9cd", "abcd", "abcd"),
    # an unterminated OSC swallows the rest, as a terminal would
    (f"ok{ESC}]0;title without end", "ok", "ok"),
    # an OSC cut by another ESC: both sequences go
    (f"a{ESC}]0;t{ESC}[31mb", "ab", "ab"),
    # bare CR: shown, not obeyed (nothing before it on the line can be overwritten)
    ("safe\rEVIL", "safe\\rEVIL", "safe\\rEVIL"),
    ("10%\r50%\r100%", "10%\\r50%\\r100%", "10%\\r50%\\r100%"),
    # newlines: shown on one line, kept where several lines are allowed (CRLF as one)
    ("one\ntwo\r\nthree", "one\\ntwo\\r\\nthree", "one\ntwo\nthree"),
    # lone controls: BEL, backspace, NUL, DEL, a C1 without a sequence, a lone ESC
    ("bell\x07 back\x08 nul\x00 del\x7f c1\x85 end" + ESC,
     "bell\\x07 back\\x08 nul\\x00 del\\x7f c1\\x85 end\\x1b",
     "bell\\x07 back\\x08 nul\\x00 del\\x7f c1\\x85 end\\x1b"),
    # removing a sequence does not build a new one from its neighbours
    (f"{ESC}{ESC}[31m[2J", "\\x1b[2J", "\\x1b[2J"),
    (f"{ESC}[{ESC}]0;t\x07", "", ""),
    # bidirectional overrides and isolates reorder what is read ("Trojan Source"): shown
    ("rm -rf \u202e/ tsil\u202c ok", "rm -rf \\u202e/ tsil\\u202c ok", "rm -rf \\u202e/ tsil\\u202c ok"),
    ("a\u2066b\u2069c\u202ad", "a\\u2066b\\u2069c\\u202ad", "a\\u2066b\\u2069c\\u202ad"),
]


@pytest.mark.parametrize("text,line,lines", CASES)
def test_inert(text, line, lines):
    assert inert(text) == line
    assert inert(text, multiline=True) == lines


@pytest.mark.parametrize("text", [c[0] for c in CASES])
def test_nothing_a_terminal_obeys_is_left(text):
    for out in (inert(text), inert(text, multiline=True)):
        assert not any(ord(ch) < 0x20 and ch not in "\t\n" or 0x7f <= ord(ch) <= 0x9f
                       or 0x202a <= ord(ch) <= 0x202e or 0x2066 <= ord(ch) <= 0x2069
                       for ch in out), repr(out)
    assert "\n" not in inert(text)


def test_inert_all_walks_events_and_answers():
    ev = {"event": "stage.end", "time": 1.5, "ok": True, "n": None,
          "error": f"step failed:\n  {ESC}]0;t\x07out\rover",
          "stages": [{"name": f"b{ESC}[2J", "error": "a\nb"}], "tags": ("x\ry",)}
    assert inert_all(ev, multiline_keys=("error",)) == {
        "event": "stage.end", "time": 1.5, "ok": True, "n": None,
        "error": "step failed:\n  out\\rover",
        "stages": [{"name": "b", "error": "a\nb"}], "tags": ["x\\ry"]}
    assert inert_all({"reason": "a\nb"}) == {"reason": "a\\nb"}
