"""The README's Python examples (blocks marked ```python; ```py marks a sketch) run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has Python examples"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})


def test_quickstart_example_runs():
    import runpy

    runpy.run_path(str(README.parent / "examples" / "quickstart.py"), run_name="__main__")
