"""Every command in the README's ```bash blocks runs here (issue 26), as written, against tiny trees in the
real layouts at the README's own paths, with small overrides appended by the test.

One temporary folder is the working directory of every command (configs/ and launch/ linked into it), holding
data/SYSU-MM01, data/RegDB and data/LLCM (fabricated trees in the authors' layouts), the files the README names
that no README command makes (pretrained/, checkpoints/*.pth, runs/regdb*, shards/regdb{1,2}, hostfile, .whl)
and whatever the commands themselves write (shards/, runs/, ...). The commands run in README order, each once
per session, whichever test asks first: a command's test runs the commands before it (they make its inputs) and
then checks its own result.

RULES below says, per launcher and script, how a command runs: for real (subprocess, tiny overrides appended),
bounded (a smaller form of the same command) or help-only. A command without a rule fails with "no rule for
README command: ...", so a new README command must be given one. A command that fails fails its test, and so
does an option or key=value override that is silently ignored: every flag and override on a README line (and
every one the test appends to a training or make_shards.py line) is checked against what the command wrote (the
run's config.yaml, results.json's meta, index.json, ...); an option no check knows fails with "no check for ...".

Cost (2 busy cores): about 3 minutes, most of it process start-up. EXPENSIVE parts are marked: the one real
two-rank `deepspeed` run, the single-process trainings and `launch/gpu_check.py --install`.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
import yaml

from mip_dist.config import from_dict, load_config, to_dict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_data_layouts import make_llcm, make_regdb, make_sysu  # noqa: E402
from test_readme import README, _commands  # noqa: E402  (the README as it is now, parsed the same way)

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TIMEOUT = 300

# Appended to every training command (all configs): the tiny model and data path, 2 steps, CPU, fp32, no
# evaluation. The synthetic sizes match SYNTHETIC_TINY, so a run on shards made by make_shards.py keeps them.
MODEL_TINY = ["model.embed_dim=64", "model.depth=3", "model.num_heads=4", "model.img_size=[64,32]"]
TRAIN_TINY = [*MODEL_TINY, "data.img_size=[64,32]", "data.batch_size=8", "data.num_instances=2", "data.workers=0",
              "data.synthetic_ids=6", "data.synthetic_test_ids=4", "data.synthetic_images_per_camera=2",
              "data.steps_per_epoch=2", "train.epochs=1", "train.eval_every_epochs=0", "train.precision=fp32",
              "train.device=cpu", "train.log_every=1", "optim.warmup_epochs=0"]
SYNTHETIC_TINY = ["--synthetic-ids", "6", "--synthetic-test-ids", "4", "--synthetic-images-per-camera", "2"]
RELEASE_WIDTH, RELEASE_DEPTH = 48, 4  # fake release checkpoints: the release configs' 12 heads at 256x128, small


# ------------------------------------------------------------------------------------------------ the commands
@dataclass
class Command:
    """One README command: its position, its words, and what is known about how it ran."""

    index: int
    argv: list[str]
    launcher: str = ""  # python | deepspeed | accelerate
    script: str = ""  # launch/x.py, or "-m pip" / "-m pytest"
    launcher_args: list[str] = field(default_factory=list)  # between the launcher and the script
    args: list[str] = field(default_factory=list)  # after the script, as written in the README

    @property
    def text(self) -> str:
        return shlex.join(self.argv)


def parse_command(index: int, argv: list[str]) -> Command:
    """Launcher, script and arguments of one README command (nothing is looked up yet)."""
    cmd = Command(index, argv)
    head = argv[0] if argv else ""
    if head in ("python", "python3"):
        cmd.launcher = "python"
        if argv[1:2] == ["-m"]:
            cmd.script, cmd.args = f"-m {argv[2]}", argv[3:]
        elif len(argv) > 1:
            cmd.script, cmd.args = argv[1], argv[2:]
    elif head in ("deepspeed", "accelerate"):
        cmd.launcher = head
        rest = argv[2:] if head == "accelerate" and argv[1:2] == ["launch"] else argv[1:]
        at = next((i for i, a in enumerate(rest) if a.endswith(".py")), None)
        if at is not None:
            cmd.launcher_args, cmd.script, cmd.args = rest[:at], rest[at], rest[at + 1:]
    return cmd


COMMANDS = [parse_command(i, argv) for i, argv in enumerate(_commands())]


def _overrides(args: list[str]) -> list[str]:
    """key=value config overrides among a script's arguments."""
    return [a for a in args if re.match(r"^[a-z_]+\.[\w.]+=", a)]


def _with(args: list[str], extra: list[str]) -> list[str]:
    """`extra` overrides right after the line's last key=value (else at the end): launch/train.py reads its
    overrides as one group (argparse), so `... a=b --resume auto c=d` would be refused."""
    at = max((i + 1 for i, a in enumerate(args) if a in _overrides(args)), default=len(args))
    return [*args[:at], *extra, *args[at:]]


def _flags(args: list[str]) -> dict[str, list[str]]:
    """--option -> its values (every occurrence, in order); a flag without a value maps to ['']."""
    out: dict[str, list[str]] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            name, eq, value = a.partition("=")
            if eq:
                out.setdefault(name, []).append(value)
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                vals = []
                while i + 1 < len(args) and not args[i + 1].startswith("--") and "=" not in args[i + 1]:
                    vals.append(args[i + 1])
                    i += 1
                out.setdefault(name, []).append(" ".join(vals))
            else:
                out.setdefault(name, []).append("")
        i += 1
    return out


def _last(flags: dict[str, list[str]], name: str) -> Optional[str]:
    """argparse's rule: the last occurrence of an option wins."""
    return flags[name][-1] if name in flags else None


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"readme_{Path(name).stem}", REPO / name)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ the world
class World:
    """The temporary working directory, and every README command's result once it has run."""

    def __init__(self, root: Path):
        self.root = root
        self.env = {k: v for k, v in os.environ.items() if k != "MIP_DEBUG"}
        (root / "tmp").mkdir()
        (root / "logs").mkdir()
        self.env.update({"PYTHONUNBUFFERED": "1", "OUT": str(root / "gpu_check_report"), "TMPDIR": str(root / "tmp"),
                         "PATH": f"{BIN}{os.pathsep}{self.env.get('PATH', '')}"})
        self.done: dict[int, Optional[str]] = {}  # command index -> None (passed) or the failure message
        self.real_multiprocess = 0  # multi-process launches run for real so far
        self.wheels: list[str] = []  # in .whl, for launch/gpu_check.py --install

    @contextlib.contextmanager
    def cwd(self):
        old = os.getcwd()
        os.chdir(self.root)
        try:
            yield
        finally:
            os.chdir(old)

    def run(self, argv: list[str], cwd: Optional[Path] = None, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
        """A subprocess in the working directory; `python`/`python3` is this interpreter, launchers from its bin;
        $VAR (the README's $OUT) expanded from the command's environment, as the shell would."""
        exe = {"python": sys.executable, "python3": sys.executable}.get(argv[0])
        if exe is None and (BIN / argv[0]).exists():
            exe = str(BIN / argv[0])
        full = [exe or argv[0], *[self.expand(a) for a in argv[1:]]]
        r = subprocess.run(full, cwd=cwd or self.root, env=self.env, capture_output=True, text=True, timeout=timeout)
        log = self.root / "logs" / f"{len(list((self.root / 'logs').glob('*')))}.log"  # for a look after a failure
        log.write_text(f"$ {shlex.join(full)}\n--- exit {r.returncode}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}")
        return r

    def expand(self, arg: str) -> str:
        return re.sub(r"\$\{?(\w+)\}?", lambda m: self.env[m.group(1)], arg)

    def result(self, cmd: Command) -> Optional[str]:
        """Run every earlier command (they make this one's inputs) and this one, once each; None or the failure."""
        rule = rule_for(cmd)
        if rule is None:  # at once, before anything runs
            pytest.fail(f"no rule for README command: {cmd.text}", pytrace=False)
        for earlier in COMMANDS[: cmd.index]:
            if earlier.index not in self.done:
                self._run_one(earlier)
        if cmd.index not in self.done:
            self._run_one(cmd, rule)
        return self.done[cmd.index]

    def _run_one(self, cmd: Command, rule: Optional["Rule"] = None) -> None:
        rule = rule or rule_for(cmd)
        try:
            assert rule is not None, f"no rule for README command: {cmd.text}"
            rule.check(self, cmd)
            self.done[cmd.index] = None
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - recorded as this command's failure, with its type
            self.done[cmd.index] = f"{type(exc).__name__}: {exc}"


def _check_ran(r: subprocess.CompletedProcess, cmd: Command) -> None:
    assert r.returncode == 0, (f"README command {cmd.index} exited {r.returncode}: {cmd.text}\n"
                               f"--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-4000:]}")


def _unchecked(cmd: Command, flags: dict, known: set[str]) -> None:
    """Every option on the line has a check (or is listed as having nothing to check)."""
    extra = sorted(set(flags) - known)
    assert not extra, f"no check for option(s) {extra} of README command: {cmd.text} (add one to its rule)"


def _config_holds(saved: dict, overrides: list[str], where: str) -> None:
    """Each key=value took effect: applying it again to the saved config changes nothing."""
    base = to_dict(from_dict(saved))
    for ov in overrides:
        again = to_dict(from_dict(saved, [ov]))
        key = ov.split("=", 1)[0]
        section, _, name = key.partition(".")
        assert again == base, (f"override {ov} was silently ignored: {where} has {key}="
                               f"{base.get(section, {}).get(name)!r}")


# ------------------------------------------------------------------------------------------------ the rules
@dataclass
class Rule:
    """How one kind of README command runs and what is checked afterwards."""

    how: str  # real | bounded | help-only (the report and the test ids say which)
    check: Callable[[World, Command], None]


def rule_pip(world: World, cmd: Command) -> None:
    """bounded: `pip install --dry-run` (no download, no install; this venv is the suite's), with the README's
    own arguments, from the repository root; every requested extra must exist."""
    report = world.root / f"pip_report_{cmd.index}.json"
    argv = ["python", "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index", "--no-build-isolation",
            "--report", str(report), *cmd.args[1:]]
    assert cmd.args[:1] == ["install"], f"no rule for README command: {cmd.text} (only `pip install` has one)"
    _check_ran(world.run(argv, cwd=REPO, timeout=120), cmd)
    for item in json.loads(report.read_text())["install"]:
        missing = set(item.get("requested_extras") or []) - set(item["metadata"].get("provides_extra") or [])
        assert not missing, f"{cmd.text}: extra(s) {sorted(missing)} not provided by {item['metadata']['name']}"


def rule_pytest(world: World, cmd: Command) -> None:
    """help-only: this suite IS that command (running it here would recurse); its options must parse with the
    repository's pytest configuration (conftest.py not imported: 0.7 s instead of 5-8 s)."""
    _check_ran(world.run(["python", "-m", "pytest", *cmd.args, "--noconftest", "--help"], cwd=REPO, timeout=120), cmd)


SHARD_CHECKS: dict[str, Callable[[dict, dict, str], None]] = {
    "--dataset": lambda index, marker, v: _eq(index["dataset"], v, "--dataset"),
    "--root": lambda index, marker, v: _eq(index["counts"]["train"]["total"] > 0, True, "--root (train images)"),
    "--out": lambda index, marker, v: None,  # index.json read from there
    "--regdb-split": lambda index, marker, v: _eq(index["regdb_split"], int(v), "--regdb-split"),
    "--chunk-instances": lambda index, marker, v: _eq(index["train_layout"]["chunk_instances"], int(v),
                                                      "--chunk-instances"),
    "--synthetic-seed": lambda index, marker, v: _eq(marker["seed"], int(v), "--synthetic-seed"),
    "--synthetic-ids": lambda index, marker, v: (_eq(marker["num_train_ids"], int(v), "--synthetic-ids"),
                                                 _eq(index["num_classes"], int(v), "--synthetic-ids")),
    "--synthetic-test-ids": lambda index, marker, v: _eq(marker["num_test_ids"], int(v), "--synthetic-test-ids"),
    "--synthetic-images-per-camera": lambda index, marker, v: _eq(marker["images_per_camera"], int(v),
                                                                  "--synthetic-images-per-camera"),
    "--quiet": lambda index, marker, v: None,  # output only
}


def _eq(have, want, what: str) -> None:
    assert have == want, f"{what} was silently ignored: wrote {have!r}, the command asked for {want!r}"


def rule_make_shards(world: World, cmd: Command) -> None:
    """real; synthetic sets get SYNTHETIC_TINY appended (the last value wins, as in argparse). Every flag is
    checked in the written index.json (and the synthetic tree's marker)."""
    from mip_dist.demo.synthetic import MARKER

    args = [*cmd.args, *(SYNTHETIC_TINY if "synthetic" in _flags(cmd.args).get("--dataset", []) else []), "--quiet"]
    _check_ran(world.run(["python", cmd.script, *args]), cmd)
    flags = _flags(args)
    _unchecked(cmd, flags, set(SHARD_CHECKS))
    index = json.loads((world.root / _last(flags, "--out") / "index.json").read_text())
    marker_file = world.root / _last(flags, "--root") / MARKER
    marker = json.loads(marker_file.read_text()) if marker_file.is_file() else {}
    for name in flags:
        SHARD_CHECKS[name](index, marker, _last(flags, name))


RUN_LINE = re.compile(r"^(\w+): step (\d+), run directory (\S+)$", re.M)


def _check_training(world: World, cmd: Command, r: subprocess.CompletedProcess, overrides: list[str]) -> Path:
    """A finished run whose saved config.yaml holds every override; returns the run folder."""
    _check_ran(r, cmd)
    found = RUN_LINE.findall(r.stdout)
    assert found, f"README command {cmd.index} printed no 'run directory' line: {cmd.text}\n{r.stdout[-2000:]}"
    status, step, run_dir = found[-1]
    assert status == "finished" and int(step) > 0, f"{cmd.text}: {status} at step {step}"
    run = world.root / run_dir
    assert (run / "model_final.pt").is_file(), f"{cmd.text}: no {run_dir}/model_final.pt"
    _config_holds(yaml.safe_load((run / "config.yaml").read_text()), overrides, f"{run_dir}/config.yaml")
    return run


def _train_options(cmd: Command, args: list[str]) -> None:
    """train.py's options on the README line, each with its check (done by the callers)."""
    _unchecked(cmd, _flags(args), {"--config", "--resume"})


def rule_train(world: World, cmd: Command) -> None:
    """real, one process: TRAIN_TINY appended; --config (the run's config.yaml is that config plus the overrides)
    and every key=value checked in the run's config.yaml; --resume auto must reach a finished run."""
    _train_options(cmd, cmd.args)
    args = _with(cmd.args, TRAIN_TINY)
    r = world.run(["python", cmd.script, *args])  # EXPENSIVE: ~10-20 s (imports, DeepSpeed engine, export)
    run = _check_training(world, cmd, r, _overrides(args))
    _check_config_file(world, cmd, run, args)


def _check_config_file(world: World, cmd: Command, run: Path, args: list[str]) -> None:
    """The run's config is --config's (or the demo's) with the overrides: --config was not ignored."""
    config = _last(_flags(args), "--config") or "configs/demo.yaml"
    with world.cwd():
        want = to_dict(load_config(config, _overrides(args)))
    have = to_dict(from_dict(yaml.safe_load((run / "config.yaml").read_text())))
    have["data"].pop("dataset"), want["data"].pop("dataset")  # auto: resolved from index.json
    assert have == want, f"{cmd.text}: {run.name}/config.yaml is not {config} with the overrides"


def _preflight(world: World, cmd: Command, world_size: int) -> None:
    """bounded training: launch/train.py's own parsing and its checks before any process group (config,
    DeepSpeed config for this world size, pretrained file, shards against the config, run folder), in process."""
    train = _load_script(cmd.script)
    resolve_dataset = getattr(train, "resolve_dataset", lambda cfg: cfg)  # data.dataset auto, where the code has it
    _train_options(cmd, cmd.args)
    args = train.parse_args(_with(cmd.args, TRAIN_TINY))
    with world.cwd():
        cfg = resolve_dataset(load_config(args.config or train.DEMO_CONFIG, args.overrides))
        train.preflight(cfg, world_size, args.resume)
    _config_holds(to_dict(cfg), _overrides(cmd.args), f"{cmd.script}'s config")


def rule_deepspeed(world: World, cmd: Command) -> None:
    """deepspeed: the first CPU-sized launch (--num_gpus <= 2, one node) runs for real with 2 ranks over gloo
    (EXPENSIVE: ~40 s); a GPU-sized one (--num_gpus 8, --hostfile) is bounded: DeepSpeed's own argument parser
    (and hostfile reader) in process, then launch/train.py's pre-process-group checks at that world size."""
    from deepspeed.launcher.runner import fetch_hostfile, parse_args

    args = parse_args([*cmd.launcher_args, cmd.script, *cmd.args])
    assert args.user_script == cmd.script and args.user_args == cmd.args, f"deepspeed misread {cmd.text}"
    _unchecked(cmd, _flags(cmd.launcher_args), {"--num_gpus", "--hostfile", "--master_port"})
    if {"--hostfile", "-H"} & set(cmd.launcher_args):  # a hostfile named on the line: its slots are the world
        hosts = fetch_hostfile(str(world.root / args.hostfile))
        assert hosts, f"{cmd.text}: deepspeed read no host from {args.hostfile}"
        world_size = sum(hosts.values())
    else:
        world_size = args.num_gpus * max(args.num_nodes, 1)
    if 0 < world_size <= 2 and args.num_nodes <= 1 and not world.real_multiprocess and not torch.cuda.is_available():
        world.real_multiprocess += 1
        launcher = ["deepspeed", "--master_port", str(_free_port()), *cmd.launcher_args]
        args = _with(cmd.args, TRAIN_TINY)
        r = world.run([*launcher, cmd.script, *args])
        run = _check_training(world, cmd, r, _overrides(args))
        _check_config_file(world, cmd, run, args)
        worlds = re.findall(r"; world (\d+);", r.stdout + r.stderr)  # the trainer's start-up line (rank 0)
        assert worlds == [str(world_size)], f"{cmd.text}: the trainer reports world {worlds}, not {world_size}"
        return
    _preflight(world, cmd, world_size)


def rule_accelerate(world: World, cmd: Command) -> None:
    """bounded: accelerate's own parser and launch validation (config file merged with the flags, which must win),
    then launch/train.py's pre-process-group checks at its world size (the two-rank CPU run is deepspeed's;
    tests/test_train_distributed.py runs accelerate launch for real)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args([*cmd.launcher_args, cmd.script, *cmd.args])
    with world.cwd():
        validated = _validate_launch_command(args)
    args = validated[0] if isinstance(validated, tuple) else args
    flags = _flags(cmd.launcher_args)
    _unchecked(cmd, flags, {"--config_file", "--num_processes", "--num_machines", "--machine_rank",
                            "--main_process_ip", "--main_process_port"})
    for name, value in flags.items():
        if name != "--config_file":
            got = getattr(args, name[2:])
            assert str(got) == value[-1], f"accelerate launch ignored {name} {value[-1]}: got {got!r}"
    assert args.training_script == cmd.script and args.training_script_args == cmd.args
    _preflight(world, cmd, int(args.num_processes))


def _eval_spec(cmd: Command) -> dict:
    """launch/evaluate.py's README options, read independently of its own parser."""
    spec: dict = {"checkpoint": [], "shards": [], "protocol": None, "overrides": [], "flags": set()}
    args, i = cmd.args, 0
    while i < len(args):
        a = args[i]
        if a in ("--checkpoint", "--shards"):
            spec[a[2:]].append(args[i + 1])
            i += 1
        elif a in ("--runs", "--config", "--out", "--dataset"):
            spec[a[2:]] = args[i + 1]
            i += 1
        elif a == "--protocol":
            spec["protocol"] = []
            while i + 1 < len(args) and not args[i + 1].startswith("-") and "=" not in args[i + 1]:
                spec["protocol"].append(args[i + 1])
                i += 1
        elif a in ("--flip", "--visualize", "--cross-dataset"):
            spec["flags"].add(a)
        elif a == "...":  # the README's "and so on" between --checkpoint/--shards pairs
            pass
        elif "=" in a and not a.startswith("-"):
            spec["overrides"].append(a)
        else:
            raise AssertionError(f"no check for evaluate.py argument {a!r} of README command: {cmd.text}")
        i += 1
    return spec


def _placeholders(world: World, args: list[str]) -> list[str]:
    """`<run>` in a path: the one folder there (e.g. runs/demo_two_datasets/<run>/model_final.pt)."""
    out = []
    for a in args:
        if "<" in a and ">" in a:
            pattern = re.sub(r"<[^>]+>", "*", a)
            hits = sorted(world.root.glob(pattern))
            assert len(hits) == 1, f"placeholder in {a}: {len(hits)} matches for {pattern}"
            a = str(hits[0].relative_to(world.root))
        out.append(a)
    return [a for a in out if a != "..."]


def rule_evaluate(world: World, cmd: Command) -> None:
    """real (tiny exported models, tiny test shards). Checked: the results file where --out / --dataset /
    --cross-dataset put it, its meta (checkpoint, shards from --shards / data.shards= / the model's config,
    protocols from --protocol, flip, config), --visualize's figures, --runs' split count."""
    spec = _eval_spec(cmd)
    args = _placeholders(world, cmd.args)
    if spec.get("config") and any(c.endswith(".pth") for c in spec["checkpoint"]):
        # the authors' file read directly with --config: the fake's width and depth (which its tensors decide and
        # --config's ViT-B values would contradict) appended; a real release checkpoint is ViT-B like the config
        args = _with(args, [f"model.embed_dim={RELEASE_WIDTH}", f"model.depth={RELEASE_DEPTH}"])
    _check_ran(world.run(["python", cmd.script, *args, "--device", "cpu"]), cmd)
    ckpts = _placeholders(world, spec["checkpoint"])
    if spec.get("runs"):  # each matching run folder's model_best.pt, else model_final.pt
        folders = sorted(p for p in world.root.glob(spec["runs"]) if p.is_dir())
        ckpts = [str(next(f / n for n in ("model_best.pt", "model_final.pt") if (f / n).is_file()))
                 for f in folders]
    shards: list[Optional[str]] = list(spec["shards"]) or [None] * len(ckpts)
    for ov in spec["overrides"]:
        key, _, value = ov.partition("=")
        assert key == "data.shards", f"no check for evaluate.py override {ov} of README command: {cmd.text}"
        shards = [value] * len(ckpts)
    name = spec.get("dataset") or (Path(shards[0]).name if "--cross-dataset" in spec["flags"] else "")
    if spec.get("out"):
        out = world.root / spec["out"]
    elif len(ckpts) == 1:
        out = (world.root / ckpts[0]).resolve().parent / "eval"
    else:
        out = Path(os.path.commonpath([str((world.root / c).resolve().parent) for c in ckpts])) / "eval_splits"
    results = out / (f"results_{name}.json" if name else "results.json")
    assert results.is_file(), f"{cmd.text}: no {results} (--out / --dataset / --cross-dataset ignored?)"
    doc = json.loads(results.read_text())
    metas = {m["checkpoint"]: m for m in ([s["meta"] for s in doc["splits"]] if "splits" in doc else [doc["meta"]])}
    want = {str((world.root / c).resolve()): s for c, s in zip(ckpts, shards)}
    assert sorted(metas) == sorted(want), f"{cmd.text}: evaluated {sorted(metas)}, the command names {sorted(want)}"
    for ckpt, shard in want.items():
        meta = metas[ckpt]
        if shard is None and ckpt.endswith(".pt"):  # the model's own test shards: --dataset's entry or its config
            blob = torch.load(ckpt, map_location="cpu", weights_only=True)
            shard = (next(d["path"] for d in blob["datasets"] if d["name"] == spec["dataset"]) if spec.get("dataset")
                     else blob["config"]["data"]["shards"])
        if shard is not None:
            _eq(meta["shards"], shard, "the test shards (--shards / data.shards= / --dataset)")
        if spec["protocol"]:
            _eq(meta["protocols"], spec["protocol"], "--protocol")
        if "--flip" in spec["flags"]:
            _eq(meta["flip"], True, "--flip")
        _eq(meta.get("config"), spec.get("config"), "--config")
    if "--visualize" in spec["flags"]:
        figures = sorted(p.name for p in out.glob("ranklist_*.png"))
        assert figures, f"{cmd.text}: --visualize wrote no ranklist_*.png in {out}"


def rule_convert_release(world: World, cmd: Command) -> None:
    """real: the fake release checkpoint (checkpoints/*.pth, written by the fixture) converted; the written file
    is an exported model of the release layout with --config's data section."""
    from mip_dist.engine.export import load_exported

    _check_ran(world.run(["python", cmd.script, *cmd.args]), cmd)
    positional = [a for a in cmd.args if not a.startswith("-") and "=" not in a]
    flags = _flags(cmd.args)
    _unchecked(cmd, flags, {"--config"})
    blob = load_exported(world.root / positional[1])
    _eq(blob["config"]["model"]["layout"], "release", "the release layout")
    if "--config" in flags:
        with world.cwd():
            want = to_dict(load_config(_last(flags, "--config"), _overrides(cmd.args)))
        _eq(blob["config"]["data"], want["data"], "--config (data section)")


def rule_gpu_check(world: World, cmd: Command) -> None:
    """real, as written (EXPENSIVE: --install pip-installs .whl's wheels and the checkout into $TMPDIR). Without
    CUDA it prints the plan and exits 0; with CUDA this rule is not the place for its 420 s: --dry-run added."""
    args = list(cmd.args) + (["--dry-run"] if torch.cuda.is_available() else [])
    r = world.run(["python", cmd.script, *args], timeout=240)
    _check_ran(r, cmd)
    flags = _flags(cmd.args)
    _unchecked(cmd, flags, {"--install", "--report"})
    if "--install" in flags:  # the wheels (where .whl has any) and the checkout installed, no other error
        lines = r.stdout.split("install: ", 1)[-1].split("PYTHONPATH=", 1)[0].splitlines()
        errors = [l.strip() for l in lines if l.strip().startswith("error:")]
        if world.wheels:
            assert not errors, f"{cmd.text}: {errors}"
        else:  # no .whl in this checkout (it is git-ignored; launch/gpu_wheels.sh fills it)
            assert all("no wheels in" in e for e in errors), f"{cmd.text}: {errors}"
        assert any(l.strip().startswith("mip_dist") for l in lines), f"{cmd.text}: checkout not installed\n{lines}"
    if "--report" in flags:
        report = world.expand(_last(flags, "--report"))
        assert report in r.stdout, f"{cmd.text}: the plan does not name the report folder {report}"
    assert ("no GPU: nothing run" if not torch.cuda.is_available() else "dry run: nothing run") in r.stdout


def rule_bench_demo(world: World, cmd: Command) -> None:
    """bounded: the README's variants with --rounds 1 --steps 1 --warmup 0 appended (the last value wins);
    every --variant must be timed (its name in the table)."""
    r = world.run(["python", cmd.script, *cmd.args, "--rounds", "1", "--steps", "1", "--warmup", "0"])
    _check_ran(r, cmd)
    flags = _flags(cmd.args)
    _unchecked(cmd, flags, {"--isa", "--rounds", "--steps", "--variant", "--warmup", "--threads"})
    for variant in flags.get("--variant", []):
        name = variant.split(":", 1)[0].strip()
        assert re.search(rf"^\s*{re.escape(name)}\b", r.stdout, re.M), f"--variant {name!r} not in\n{r.stdout}"


def _positional(args: list[str], flags_with_values: set[str]) -> list[str]:
    """Arguments that are neither options nor an option's value."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a.startswith("--"):
            skip = a in flags_with_values
        else:
            out.append(a)
    return out


def rule_extract(world: World, cmd: Command) -> None:
    """real (the tiny exported model, the README's tree and shards; --device cpu). Checked in the written
    feature file and sidecar: one row per input image, --modality / --camera on every row of a folder, the
    model's sha256, and every row's modality, camera and identity from the shards for a test-shard input."""
    from mip_dist.engine.file_hash import sha256_file
    from mip_dist.inference.feature_file import load_features

    valued = {"--model", "--out", "--modality", "--camera", "--batch-size", "--device", "--precision"}
    _check_ran(world.run(["python", cmd.script, *cmd.args, "--device", "cpu"]), cmd)
    flags = _flags(cmd.args)
    _unchecked(cmd, flags, {"--model", "--out", "--modality", "--camera"})
    feats = load_features(world.root / _last(flags, "--out"))
    _eq(feats.model_sha256, sha256_file(world.root / _last(flags, "--model")), "--model (the recorded sha256)")
    expected = 0
    for source in map(world.root.joinpath, _positional(cmd.args, valued)):
        if (source / "index.json").is_file():
            index = json.loads((source / "index.json").read_text())
            expected += sum(s["count"] for s in index["shards"] if s["split"] != "train")
        else:
            expected += sum(1 for f in source.rglob("*") if f.suffix.lower() in (".jpg", ".png", ".bmp"))
    _eq(len(feats.items), expected, "the inputs (one feature per image)")
    assert all(i["modality"] in ("visible", "infrared") for i in feats.items), f"{cmd.text}: a row has no modality"
    if "--modality" in flags:
        _eq({i["modality"] for i in feats.items}, {_last(flags, "--modality")}, "--modality")
    if "--camera" in flags:
        _eq({i["camera"] for i in feats.items}, {int(_last(flags, "--camera"))}, "--camera")
    assert feats.features.shape == (expected, feats.dim) and torch.allclose(
        feats.features.norm(dim=1), torch.ones(expected), atol=1e-4), f"{cmd.text}: features not L2-normalised"


def rule_search(world: World, cmd: Command) -> None:
    """real (feature files the README's extract commands wrote). Checked in --out's results.json: every query,
    at most --topk matches each, ranked by score, cross-modality unless --all-modalities; the PNGs and CSV."""
    from mip_dist.inference.feature_file import load_features

    _check_ran(world.run(["python", cmd.script, *cmd.args]), cmd)
    flags = _flags(cmd.args)
    _unchecked(cmd, flags, {"--query", "--gallery", "--topk", "--out", "--all-modalities"})
    out = world.root / (_last(flags, "--out") or "search_results")
    doc = json.loads((out / "results.json").read_text())
    queries = load_features(world.root / _last(flags, "--query"))
    _eq(len(doc["queries"]), len(queries.items), "--query (one result per query)")
    topk = int(_last(flags, "--topk") or 10)
    _eq(doc["topk"], topk, "--topk")
    for rec in doc["queries"]:
        scores = [m["score"] for m in rec["matches"]]
        assert 0 < len(scores) <= topk and scores == sorted(scores, reverse=True), f"{cmd.text}: {rec}"
        if "--all-modalities" not in flags:
            assert all(m["modality"] != rec["query"]["modality"] for m in rec["matches"]), f"{cmd.text}: {rec}"
    assert (out / "results.csv").is_file() and list(out.glob("ranklist_*.png")), f"{cmd.text}: no CSV or figures"


def rule_export_onnx(world: World, cmd: Command) -> None:
    """real (the tiny exported model): the command's own onnxruntime check passes, the graph and its sha256
    sidecar are written, and onnxruntime gives one L2-normalised feature per image of a batch of 2."""
    import numpy as np
    import onnxruntime as ort

    from mip_dist.engine.file_hash import check_sidecar, read_sidecar

    r = world.run(["python", cmd.script, *cmd.args])
    _check_ran(r, cmd)
    flags = _flags(cmd.args)
    _unchecked(cmd, flags, set())
    model, out = _positional(cmd.args, set())
    assert "check: onnxruntime vs PyTorch" in r.stdout and "graph inputs:" in r.stdout, r.stdout
    assert read_sidecar(world.root / out) is not None, f"{cmd.text}: no {out}.sha256"
    check_sidecar(world.root / out)
    session = ort.InferenceSession(str(world.root / out), providers=["CPUExecutionProvider"])
    feeds = {}
    for i in session.get_inputs():
        if i.name == "image":
            feeds[i.name] = np.random.default_rng(0).standard_normal((2, *i.shape[1:]), dtype=np.float32)
        else:
            feeds[i.name] = np.zeros(2, dtype=np.int64)
    (features,) = session.run(None, feeds)
    assert features.shape[0] == 2 and np.allclose(np.linalg.norm(features, axis=1), 1, atol=1e-4), features.shape


# (launcher, script) -> rule; "python" covers python3. Scripts absent here (bench_attention, bench_data, ...)
# have no README ```bash command today: a new one needs a rule.
RULES: dict[tuple[str, str], Rule] = {
    ("python", "-m pip"): Rule("bounded", rule_pip),
    ("python", "-m pytest"): Rule("help-only", rule_pytest),
    ("python", "launch/make_shards.py"): Rule("real", rule_make_shards),
    ("python", "launch/train.py"): Rule("real", rule_train),
    ("deepspeed", "launch/train.py"): Rule("real or bounded", rule_deepspeed),
    ("accelerate", "launch/train.py"): Rule("bounded", rule_accelerate),
    ("python", "launch/evaluate.py"): Rule("real", rule_evaluate),
    ("python", "launch/convert_release.py"): Rule("real", rule_convert_release),
    ("python", "launch/gpu_check.py"): Rule("real", rule_gpu_check),
    ("python", "launch/bench_demo.py"): Rule("bounded", rule_bench_demo),
    ("python", "launch/extract.py"): Rule("real", rule_extract),
    ("python", "launch/search.py"): Rule("real", rule_search),
    ("python", "launch/export_onnx.py"): Rule("real", rule_export_onnx),
}


def rule_for(cmd: Command) -> Optional[Rule]:
    return RULES.get((cmd.launcher, cmd.script))


# ------------------------------------------------------------------------------------------------ the fixture
def _exported(path: Path, config: str, overrides: list[str], index: dict) -> None:
    """A tiny exported model (real weights, saved config = config + overrides) for the README's runs/<name>."""
    from mip_dist.engine.export import export_model
    from mip_dist.model import build_model

    cfg = load_config(REPO / config, [*MODEL_TINY, "model.pretrained=", "data.img_size=[64,32]", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.attention, int(index["num_classes"]), int(index["num_cameras"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    export_model(path, model.state_dict(), cfg, int(index["num_classes"]), int(index["num_cameras"]))


def _release_checkpoint(path: Path, config: str, index: dict) -> None:
    """A state dict in the MIP authors' naming (tests/test_release.py's mapping) with the release config's image
    size and heads (what the tensors cannot tell), small width and depth, and the shards' class/camera counts."""
    from test_release import to_their_naming

    from mip_dist.model import build_model

    cfg = load_config(REPO / config, [f"model.embed_dim={RELEASE_WIDTH}", f"model.depth={RELEASE_DEPTH}",
                                      "model.pretrained="])
    torch.manual_seed(1)
    model = build_model(cfg.model, cfg.attention.__class__(impl="torch"), int(index["num_classes"]),
                        int(index["num_cameras"]))
    with torch.no_grad():
        model.ipg.queries.zero_()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(to_their_naming(model.eval()), path)


def _pretrained(path: Path) -> None:
    """A timm ViT file at the paper config's model.pretrained path, as wide and deep as MODEL_TINY."""
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, embed_dim=64, depth=3, num_heads=4)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(vit.state_dict(), path)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    """The working directory of every README command: the trees, and the files no README command makes."""
    from mip_dist.data.shards import write_shards

    root = tmp_path_factory.mktemp("readme_commands")
    for name in ("configs", "launch"):
        (root / name).symlink_to(REPO / name, target_is_directory=True)
    make_sysu(root / "data" / "SYSU-MM01")
    make_regdb(root / "data" / "RegDB", splits=(1, 2))
    make_llcm(root / "data" / "LLCM")
    index = {}
    for name, dataset, split in (("sysu", "sysu", 1), ("regdb1", "regdb", 1), ("regdb2", "regdb", 2)):
        tree = root / "data" / ("SYSU-MM01" if dataset == "sysu" else "RegDB")
        out = root / ("scratch" if dataset == "sysu" else "shards") / name  # README's shards/sysu: make_shards.py
        index[name] = write_shards(dataset, str(tree), str(out), regdb_split=split, workers=1, progress=False)
    # runs/regdb, runs/regdb1, runs/regdb2: one RegDB model per split (the README's multi-split evaluation)
    regdb_cfg = "configs/mip_vitb16_regdb.yaml"
    _exported(root / "runs" / "regdb" / "model_final.pt", regdb_cfg, ["data.shards=shards/regdb"], index["regdb1"])
    for split in (1, 2):
        _exported(root / "runs" / f"regdb{split}" / "model_best.pt", regdb_cfg,
                  [f"data.shards=shards/regdb{split}", f"data.regdb_split={split}"], index[f"regdb{split}"])
    _release_checkpoint(root / "checkpoints" / "sysu.pth", "configs/mip_vitb16_sysu_release.yaml", index["sysu"])
    _release_checkpoint(root / "checkpoints" / "regdb.pth", "configs/mip_vitb16_regdb_release.yaml", index["regdb1"])
    _pretrained(root / load_config(REPO / "configs" / "mip_vitb16_sysu.yaml").model.pretrained)
    (root / "hostfile").write_text("localhost slots=8\n")  # the README's form: "host slots=8" per line
    world = World(root)
    (root / ".whl").mkdir()  # the checkout's .whl (git-ignored, filled by launch/gpu_wheels.sh): the wheels this
    for wheel in sorted((REPO / ".whl").glob("*.whl")):  # interpreter can install (the rest are for the GPU
        if _installable(wheel.name):  # machine's Python)
            (root / ".whl" / wheel.name).symlink_to(wheel)
            world.wheels.append(wheel.name)
    return world


def _installable(wheel: str) -> bool:
    """pip would install this wheel file on this interpreter (its tags are among this platform's)."""
    try:
        from packaging.tags import sys_tags
        from packaging.utils import parse_wheel_filename
    except ImportError:
        return wheel.endswith("-none-any.whl")
    return bool(set(parse_wheel_filename(wheel)[3]) & set(sys_tags()))


def _id(cmd: Command) -> str:
    rule = rule_for(cmd)
    return f"{cmd.index:02d}-{rule.how if rule else 'no-rule'}-{cmd.text[:50]}"


def test_every_readme_command_has_a_rule():
    """Cheap and first: a new README command needs a rule (and the README still has its commands)."""
    assert "```bash" in README and len(COMMANDS) >= 10
    missing = [c.text for c in COMMANDS if rule_for(c) is None]
    assert not missing, "no rule for README command(s): " + "; ".join(missing)


@pytest.mark.parametrize("cmd", COMMANDS, ids=_id)
def test_readme_command_runs(world, cmd):
    failure = world.result(cmd)
    assert failure is None, failure
