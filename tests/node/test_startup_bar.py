"""`darkbloom node`'s start-up progress: `models prepare`'s bar on a terminal, plain lines otherwise
(captured streams; the whole command in a subprocess is tests/chaos/test_node_startup.py)."""

from __future__ import annotations

import io

from darkbloom.node.commands import startup_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


STEPS = [("preparing tiny", 1, 4), ("preparing tiny", 4, 4), ("loading tiny", 0, 1), ("loading tiny", 1, 1),
         ("self-benchmark", 0, 1), ("self-benchmark", 1, 1)]


def test_a_terminal_gets_one_bar_per_step():
    out = Terminal()
    bar = startup_bar(out)
    for step in STEPS:
        bar(*step)
    bar.finish()
    lines = out.getvalue().split("\n")
    assert lines[-1] == ""  # the last bar was ended with a newline
    finals = [line.rsplit("\r", 1)[-1] for line in lines[:-1]]  # what the terminal shows for each step
    assert [f.split(" [")[0].strip() for f in finals] == ["preparing tiny", "loading tiny", "self-benchmark"]
    assert all("[" + "#" * 30 + "]" in f for f in finals)  # each step's bar ends full
    assert "[" + "#" * 7 + "." * 23 + "] 1/4" in lines[0]  # the bar moved before it filled


def test_a_pipe_gets_a_line_as_each_step_starts_and_ends():
    out = io.StringIO()
    bar = startup_bar(out)
    for step in STEPS:
        bar(*step)
    bar.finish()
    assert out.getvalue().splitlines() == [
        "preparing tiny ...", "preparing tiny: done (4/4)",
        "loading tiny ...", "loading tiny: done (1/1)",
        "self-benchmark ...", "self-benchmark: done (1/1)",
    ]
    assert "\r" not in out.getvalue()
