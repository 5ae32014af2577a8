"""The README's Python examples (blocks marked ```python; ```py marks a sketch) run as written,
in a temporary working folder (the TRL example writes its output folder there)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has Python examples"
    monkeypatch.chdir(tmp_path)
    namespaces = []
    for block in blocks:
        namespaces.append({})
        exec(compile(block, str(README), "exec"), namespaces[-1])
    # The TRL example is complete: it trains its two steps and logs KPO's metrics at each.
    (trl,) = [ns for ns in namespaces if "KPOTrainer" in ns]
    logs = [e for e in trl["trainer"].state.log_history if "loss" in e]
    assert trl["trainer"].state.global_step == 2 and len(logs) == 2
    assert all("kpo/filtered_ratio_mean" in e for e in logs)


def test_quickstart_example_runs():
    import runpy

    runpy.run_path(str(README.parent / "examples" / "quickstart.py"), run_name="__main__")
