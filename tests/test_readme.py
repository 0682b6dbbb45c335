"""The README cannot drift from the code: its commands name real scripts, configs and flags."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from mip_dist.config import load_config

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def _commands() -> list[list[str]]:
    """Shell commands in the README's bash blocks (continuation lines joined, comments dropped)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split(" # ")[0].strip()
            if line and not line.startswith("#"):
                for part in line.split("&&"):
                    out.append(shlex.split(part))
    return out


COMMANDS = _commands()
LAUNCH_CALLS = [c for c in COMMANDS if any(a.startswith("launch/") for a in c)]


def test_readme_has_the_two_quickstart_commands():
    assert "<!-- main-command -->" in README and "<!-- test-command -->" in README
    assert any(c[:2] == ["python", "launch/train.py"] and len(c) == 2 for c in COMMANDS)


@pytest.mark.parametrize("cmd", LAUNCH_CALLS, ids=lambda c: " ".join(c)[:60])
def test_every_named_file_exists(cmd):
    for arg in cmd:
        if arg.startswith(("launch/", "configs/")):
            assert (REPO / arg).is_file(), f"README names {arg}, which does not exist"


@pytest.mark.parametrize("cmd", LAUNCH_CALLS, ids=lambda c: " ".join(c)[:60])
def test_every_flag_is_accepted(cmd):
    script = next(a for a in cmd if a.startswith("launch/"))
    helptext = subprocess.run([sys.executable, str(REPO / script), "--help"], capture_output=True, text=True,
                              timeout=120, cwd=REPO)
    assert helptext.returncode == 0, helptext.stderr
    for arg in cmd[cmd.index(script) + 1:]:
        if arg.startswith("--"):
            assert arg.split("=")[0] in helptext.stdout, f"{script} has no option {arg}"
        elif ": " in arg:  # bench_demo.py's "name: key=value ..." variant: its overrides are real config keys
            load_config(None, shlex.split(arg.split(":", 1)[1]))
        elif "=" in arg and not arg.startswith("-"):  # key=value override: must be a real config key
            load_config(None, [arg if arg.split("=")[0] != "model.pretrained" else "model.pretrained=x.pth"])


@pytest.mark.parametrize("path", sorted(set(re.findall(r"`(configs/[\w/.]+\.(?:yaml|json))`", README))))
def test_named_configs_exist(path):
    assert (REPO / path).is_file(), f"README names {path}, which does not exist"
