"""Every README command runs in a smoke form, or is exempt with a reason
(`scripts/check_readme.py`: its tables are where README commands are registered)."""

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_check():
    spec = importlib.util.spec_from_file_location("check_readme", REPO / "scripts" / "check_readme.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_readme"] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


check = load_check()


def readme_plan():
    return check.plan(check.readme_commands((REPO / "README.md").read_text()))


def test_the_plan_reads_commands_as_documented():
    text = '''
```bash
scripts/setup.sh && .venv/bin/python -m stagejax.run   # set up, then run
python -m stagejax.run decode.prompt="a # b" model=tiny  # a comment
stagejax-run -m schedule=atomic,layer
python -m stagejax.nothing_registered
```
```python
import stagejax
model = stagejax.load_model("smollm2_135m")
print(stagejax.generate(model, "x", max_new_tokens=16).text)
```
'''
    commands = check.plan(check.readme_commands(text))
    assert [c.readme for c in commands][:5] == [
        "scripts/setup.sh", ".venv/bin/python -m stagejax.run",
        'python -m stagejax.run decode.prompt="a # b" model=tiny',
        "stagejax-run -m schedule=atomic,layer", "python -m stagejax.nothing_registered"]
    assert commands[0].exempt and commands[4].unregistered
    run = check.argv_of(commands[2], Path("/run"))
    assert run[0] == sys.executable and run[1:4] == ["-m", "stagejax.run", "decode.prompt=a # b"]
    assert run.count("model=tiny") == 1 and "decode.max_new_tokens=2" in run
    assert run[-1] == "hydra.run.dir=/run"
    assert check.argv_of(commands[3], Path("/run"))[-1] == "hydra.sweep.dir=/run"
    assert '"tiny"' in commands[5].smoke and "max_new_tokens=2" in commands[5].smoke


def test_every_readme_command_is_run_or_exempt():
    commands = readme_plan()
    assert [c.readme for c in commands if c.unregistered] == []
    documented = {c.readme for c in commands}
    assert (set(check.SMOKE) | set(check.EXEMPT)) - documented == set(), \
        "rows for commands the README no longer has"


def test_readme_commands_run_in_their_smoke_forms(tmp_path):
    commands = readme_plan()
    results = check.run(commands, tmp_path, jobs=2, progress=False)
    failed = [f"{r.command.readme}\n  ran: {' '.join(r.argv)}\n{r.output[-2000:]}"
              for r in results if r.returncode != 0]
    assert not failed, "\n\n".join(failed)
    # identical smoke forms run once (`python -m stagejax.run` and `... model=tiny`)
    forms = {tuple(check.argv_of(c, Path("RUN_DIR"))) for c in commands if c.smoke is not None}
    assert len(results) == len(forms) >= 8
