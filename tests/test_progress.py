"""Progress lines stay readable when output goes to a file (no giant \\r line)."""
import io

from radargate_kernels.progress import Progress


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_redirected_output_gets_a_few_plain_lines():
    out = io.StringIO()
    bar = Progress(200, "train", stream=out)
    for i in range(1, 201):
        bar.update(i, f"loss {1 / i:.3f}")
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert 4 <= len(lines) <= 5 and lines[-1].startswith("train [") and "200/200" in lines[-1]


def test_terminal_output_redraws_one_line():
    out = _Tty()
    bar = Progress(50, "sweep", stream=out)
    for i in range(1, 51):
        bar.update(i)
    text = out.getvalue()
    assert text.count("\r") == 50 and text.count("\n") == 1 and text.endswith("\n")
