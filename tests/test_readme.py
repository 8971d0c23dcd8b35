"""README.md stays true: its quickstart runs, and CI runs exactly the test command it gives."""

import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def test_quickstart_runs():
    quickstart = README.split("## Quickstart", 1)[1]
    source = re.search(r"```python\n(.*?)```", quickstart, flags=re.S).group(1)
    namespace: dict = {}
    exec(compile(source, "README.md#quickstart", "exec"), namespace)
    assert namespace["ys"].shape == (4, 50, 64)


def test_opening_commands_are_setup_then_main_job_then_tests():
    commands = re.findall(r"```bash\n(.*?)\n```", README.split("##", 1)[0], flags=re.S)
    assert len(commands) == 2, commands
    main_job, tests = commands
    assert main_job.startswith("python3 -m venv .venv") and "pip install" in main_job
    assert tests.startswith("python3 -m venv .venv") and tests.endswith('python -m pytest -q -m "not slow"')


def test_ci_extracts_the_readme_test_command():
    line = subprocess.run(
        ["grep", "-m1", "-E", r"^python3 -m venv .* pytest", "README.md"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    assert line.endswith('python -m pytest -q -m "not slow"')
    assert "grep -m1 -E '^python3 -m venv .* pytest' README.md" in (ROOT / ".ci" / "run").read_text()
