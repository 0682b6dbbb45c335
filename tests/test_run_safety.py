"""Runs that cannot clobber each other: one writer per run folder (run.lock), a resume that would change what
its steps, epochs or weights mean is refused before start-up, datasets told apart by content, convert_release's
output folder made before the work, `latest` only naming complete tags, and a peer's timeout not blamed on
the disk."""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from collections import namedtuple
from types import SimpleNamespace
from pathlib import Path

import pytest

from mip_dist.cli import report_error
from mip_dist.config import ConfigError, DataConfig, ShardSource, load_config
from mip_dist.data.shard_reader import DataError
from mip_dist.data.sources import resolve_sources
from mip_dist.engine import checkpoint as ckpt, run_dir as rd
from mip_dist.engine.optim import lr_multiplier

import test_checkpoint_safety as safety
from conftest import load_launch_script
from test_checkpoint_safety import StubEngine, make_engine
from test_release import _load_launch, _save, release_model, to_their_naming
from test_train_distributed import losses, make_tiny_shards

REPO = Path(__file__).resolve().parent.parent
TRAIN = str(REPO / "launch" / "train.py")
TINY = str(REPO / "configs" / "tiny.yaml")
ROUNDS = 20
Usage = namedtuple("Usage", "total used free")
process_group = safety.process_group  # its one-rank gloo group fixture, for a real DeepSpeed engine


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    return root, make_tiny_shards(root)


@pytest.fixture(scope="module")
def cli():
    """launch/train.py as a module."""
    return _load_launch("train")


@pytest.fixture
def no_training(cli, monkeypatch):
    """main() stops where the process group would start: the calls it got that far with."""
    reached = []
    monkeypatch.setattr(cli, "train", lambda cfg, args, debug: reached.append((cfg, args)) or
                        {"status": "finished", "step": 0, "run_dir": str(cfg.train.output_dir)})
    monkeypatch.setattr(cli, "report", lambda summary: None)
    yield reached
    rd.release_run_dirs()


def _error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


# ------------------------------------------------------------------ one writer per run folder

RACE = textwrap.dedent('''
    """One of two racers: per round, wait for the other, then claim run folder r<i> as launch/train.py does."""
    import json, os, sys, time
    from pathlib import Path
    from mip_dist.config import load_config
    from mip_dist.engine.run_dir import RunDirError, agree_run_dir

    out, me, rounds, config = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]

    def wait_for(*names):
        deadline = time.time() + 60
        while not all((out / n).exists() for n in names):
            assert time.time() < deadline, names
            time.sleep(0.0005)

    def post(name, text=""):
        (out / (name + ".tmp")).write_text(text)
        os.replace(out / (name + ".tmp"), out / name)

    for i in range(rounds):
        cfg = load_config(config, [f"train.output_dir={out / 'runs'}", f"train.run_name=r{i}"])
        post(f"ready{i}.{me}")
        wait_for(f"ready{i}.a", f"ready{i}.b")
        try:
            agree_run_dir(cfg, None, True)
            result = {"won": True}
        except RunDirError as exc:
            result = {"won": False, "error": str(exc)}
        post(f"result{i}.{me}", json.dumps({**result, "pid": os.getpid()}))
        wait_for(f"result{i}.a", f"result{i}.b")  # the winner holds r<i> until both have tried
''')


def test_two_starts_on_one_run_folder_exactly_one_wins_every_time(tmp_path):
    """Two processes claim the same run folder at the same moment, 20 times: one wins, the other's error
    names the winner (old code: both got the folder and wrote into it)."""
    script = tmp_path / "race.py"
    script.write_text(RACE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    procs = {me: subprocess.Popen([sys.executable, str(script), str(tmp_path), me, str(ROUNDS), TINY], cwd=REPO,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for me in ("a", "b")}
    for me, p in procs.items():
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
    for i in range(ROUNDS):
        results = [json.loads((tmp_path / f"result{i}.{me}").read_text()) for me in ("a", "b")]
        winners = [r for r in results if r["won"]]
        assert len(winners) == 1, (i, results)
        loser = next(r for r in results if not r["won"])
        assert "is in use by another run" in loser["error"], loser
        assert f"host {socket.gethostname()}, pid {winners[0]['pid']}, started " in loser["error"], loser
        assert (tmp_path / "runs" / f"r{i}" / "run.lock").read_text() == ""  # released when the winner exited


def test_a_live_holder_is_named_before_start_up_and_a_dead_ones_lock_is_taken_over(setup, cli, no_training,
                                                                                    capsys, caplog):
    root, base = setup
    run = root / "runs" / "held"
    run.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f'''
        import fcntl, json, os, socket, sys, time
        fd = os.open({str(run / "run.lock")!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, json.dumps({{"host": socket.gethostname(), "pid": os.getpid(), "started": "then"}}).encode())
        print("locked", flush=True)
        time.sleep(120)
    ''')], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for extra in ([], ["--resume", "auto"]):
            assert cli.main(["--config", TINY, *base, "train.run_name=held", *extra]) == 2
            line = _error_line(capsys.readouterr().err)
            assert f"{run} is in use by another run (host {socket.gethostname()}, pid {holder.pid}, started then)" \
                in line, line
        assert no_training == []  # refused before any process group
        cfg = load_config(TINY, base + ["train.run_name=held"])
        with pytest.raises(rd.RunDirError, match=f"pid {holder.pid}"):
            rd.claim_run_dir(cfg, None)  # the atomic claim agrees
    finally:
        holder.kill()
        holder.wait()
    with caplog.at_level(logging.WARNING, logger="mip_dist.engine.run_dir"):
        assert rd.claim_run_dir(cfg, None) == (run, None)  # its process is gone: taken over
    assert f"taking over the lock of a run that ended without releasing it (host {socket.gethostname()}, " \
           f"pid {holder.pid}" in caplog.text
    assert json.loads((run / "run.lock").read_text())["pid"] == os.getpid()
    rd.release_run_dirs()
    assert (run / "run.lock").read_text() == ""
    (run / "run.lock").write_text(json.dumps({"host": "elsewhere", "pid": 7, "started": "then"}))
    with pytest.raises(rd.RunDirError, match=r"names a run that this host cannot check \(host elsewhere, pid 7.*"
                                             r"delete .*run\.lock"):
        rd.claim_run_dir(cfg, None)


# ------------------------------------------------------------------ a resume that means another run is refused


@pytest.fixture(scope="module")
def one_epoch(setup):
    """A finished 1-epoch tiny run (3 steps)."""
    root, base = setup
    args = base + ["train.epochs=1", "train.run_name=base"]
    r = subprocess.run([sys.executable, TRAIN, "--config", TINY, *args], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert r.returncode == 0, r.stderr[-4000:]
    return root / "runs" / "base", args


@pytest.mark.parametrize("extra,world,expect", [
    (["data.batch_size=16", "train.epochs=2"], 1,
     ["data.batch_size: 8 -> 16", "train.epochs: 1 -> 2", "--allow-config-change train.epochs",
      "data.batch_size cannot change in a resumed run"]),
    (["model.embed_dim=32"], 1, ["model.embed_dim: 64 -> 32"]),
    (["optim.lr=0.02"], 1, ["optim.lr: 0.01 -> 0.02", "--allow-config-change optim.lr"]),
    (["train.epochs=2", "--allow-config-change", "data.batch_size"], 1,
     ["--allow-config-change data.batch_size: data.batch_size cannot change when resuming"]),
    ([], 2, ["was written by 1 ranks and this job has 2", "start 1 processes"]),
], ids=["batch-and-epochs", "model-key", "lr", "not-allowable", "world-size"])
def test_a_resume_that_changes_the_runs_meaning_is_one_line_before_start_up(one_epoch, cli, no_training, capsys,
                                                                           monkeypatch, extra, world, expect):
    run, args = one_epoch
    monkeypatch.setenv("WORLD_SIZE", str(world))
    assert cli.main(["--config", TINY, *args, *extra, "--resume", "auto"]) == 2
    line = _error_line(capsys.readouterr().err)
    for text in expect:
        assert text in line, line
    assert "DictOutput" not in line and no_training == []


def test_a_moved_copy_of_the_data_resumes_and_other_data_is_refused(one_epoch, setup, cli, no_training, capsys,
                                                                    tmp_path):
    """The datasets are compared by their index.json fingerprint, not their path."""
    root, _ = setup
    run, args = one_epoch
    copy = shutil.copytree(root / "shards", tmp_path / "moved")
    assert cli.main(["--config", TINY, *args, f"data.shards={copy}", "--resume", "auto"]) == 0
    assert len(no_training) == 1
    index = json.loads((copy / "index.json").read_text())
    index["fingerprint"] = "0" * 64
    (copy / "index.json").write_text(json.dumps(index))
    assert cli.main(["--config", TINY, *args, f"data.shards={copy}", "--resume", "auto"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "data.shards: other datasets than the run's" in line and len(no_training) == 1


def test_more_epochs_when_allowed_continue_the_schedule(one_epoch):
    """--allow-config-change train.epochs: the run goes on from step 3 to 6 at the LR its schedule gives
    each step (old code: the option did not exist)."""
    run, args = one_epoch
    r = subprocess.run([sys.executable, TRAIN, "--config", TINY, *args, "--resume", "auto",
                        "--allow-config-change", "train.epochs", "train.epochs=2"],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert r.returncode == 0, r.stderr[-4000:]
    assert "train.epochs: 1 -> 2 (--allow-config-change)" in r.stderr
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in recs if x["kind"] == "train"]
    assert [x["step"] for x in train] == [1, 2, 3, 4, 5, 6] and len(losses(run)) == 6
    cfg = load_config(run / "config.yaml")
    assert cfg.train.epochs == 2  # the run's config now
    for x in train[3:]:
        assert x["lr"] == pytest.approx(cfg.optim.lr * lr_multiplier((x["step"] - 1) / 3, cfg.optim))
    assert json.loads((run / "FINISHED").read_text())["step"] == 6
    assert (run / "run.lock").read_text() == ""  # released at the end


# ------------------------------------------------------------------ datasets by content


def test_a_copied_dataset_is_a_duplicate_and_names_are_plain_words(setup, tmp_path):
    root, _ = setup
    copy = shutil.copytree(root / "shards", tmp_path / "copy")
    twice = DataConfig(shards=[ShardSource(path=str(root / "shards"), name="a"), ShardSource(path=str(copy), name="b")],
                       batch_size=8, num_instances=2, img_size=(64, 32))
    with pytest.raises(DataError, match=r"data\.shards\[1\]: .*copy is already listed as dataset 'a' \(a copy: its "
                                        r"index\.json has the same fingerprint\)"):
        resolve_sources(twice)
    with pytest.raises(ConfigError, match=r"data\.shards\[1\]\.name: dataset name 'a/b' must be a plain word"):
        load_config(TINY, [f"data.shards=[{{path: {root / 'shards'}, name: a}}, {{path: {copy}, name: a/b}}]"])


# ------------------------------------------------------------------ convert_release's output folder


def test_convert_release_makes_its_output_folder_or_refuses_before_converting(tmp_path, capsys, monkeypatch):
    _, ours = release_model()
    their = _save(to_their_naming(ours), tmp_path / "their.pth")
    convert = _load_launch("convert_release")
    out = tmp_path / "new" / "sub" / "out.pt"
    assert convert.main([str(their), str(out), "--config", TINY]) == 0 and out.is_file()
    (tmp_path / "afile").write_text("")
    import mip_dist.model.release as release

    monkeypatch.setattr(release, "release_blob", lambda *a, **k: pytest.fail("converted before checking the folder"))
    assert convert.main([str(their), str(tmp_path / "afile" / "out.pt"), "--config", TINY]) == 2
    line = _error_line(capsys.readouterr().err)
    assert f"cannot create its folder {tmp_path / 'afile'}" in line


# ------------------------------------------------------------------ `latest` and a peer's timeout


def test_latest_names_only_a_complete_tag(process_group, tmp_path, monkeypatch):
    engine, cfg = make_engine(0, "fp32")
    c = ckpt.Checkpointer(tmp_path / "run", keep_last=3, is_main=True)
    real, seen = engine.save_checkpoint, []

    def save_checkpoint(*args, **kwargs):  # what `latest` says once DeepSpeed has written this rank's files
        done = real(*args, **kwargs)
        seen.append((c.dir / "latest").read_text() if (c.dir / "latest").is_file() else None)
        return done

    monkeypatch.setattr(engine, "save_checkpoint", save_checkpoint)
    c.save(engine, 1, {"step": 1})
    assert seen == [None] and (c.dir / "latest").read_text() == "step00000001"
    monkeypatch.setattr(ckpt, "write_manifest", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(ckpt.CheckpointWriteError):
        c.save(engine, 2, {"step": 2})
    assert seen[1] == "step00000001"  # not the tag being written
    assert (c.dir / "latest").read_text() == "step00000001" and not (c.dir / "step00000002").exists()


@pytest.mark.parametrize("where,exc,names", [
    ("save", RuntimeError("[/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms for recv operation "
                          "to complete"), "DeepSpeed's save_checkpoint"),
    ("barrier", RuntimeError("Application timeout caused pair closure"), "the barrier after every rank wrote"),
    ("save", RuntimeError("[/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:27289: Connection reset by peer"),
     "DeepSpeed's save_checkpoint"),
])
def test_a_peer_that_does_not_answer_during_a_save_is_not_called_a_full_disk(tmp_path, monkeypatch, where, exc, names):
    """On a nearly full disk too (old code: 'no space left on the disk ... free space there')."""
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: Usage(100 * 2**30, 100 * 2**30 - 2**20, 2**20))
    c = ckpt.Checkpointer(tmp_path / "run", keep_last=2, is_main=True)
    engine = StubEngine(exc if where == "save" else None)
    if where == "barrier":
        monkeypatch.setattr(ckpt, "barrier", lambda: (_ for _ in ()).throw(exc))
    with pytest.raises(Exception) as info:
        c.save(engine, 1, {"step": 1})
    msg = str(info.value)
    assert type(info.value).__name__ == "CollectiveTimeoutError", msg
    assert names in msg and "a peer rank did not answer" in msg and "space" not in msg and "\n" not in msg


class _Batches:
    """A train stream stub: `n` empty batches per epoch."""

    def __init__(self, n: int) -> None:
        self.n = n

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        return iter([{}] * self.n)


def _epoch_failing_with(exc: Exception) -> Exception:
    """What Trainer._train_epoch raises when its first step raises `exc` (the trainer's other parts stubbed)."""
    from mip_dist.engine.trainer import Trainer

    def train_step(batch, data_wait):
        raise exc

    stub = SimpleNamespace(stream=_Batches(3), _stream_state=None, micro_in_epoch=0, micro_per_epoch=3, epoch=1,
                           step=6, _stop=False, _train_step=train_step)
    with pytest.raises(Exception) as info:
        Trainer._train_epoch(stub)
    return info.value


@pytest.mark.parametrize("exc", [
    RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Timed out waiting 300000ms for recv operation"
                 " to complete"),
    RuntimeError("[/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:27289: Connection reset by peer"),
])
def test_a_peer_that_does_not_answer_during_a_training_step_is_one_named_line(exc, capsys):
    """The step's all-reduce waiting on a stopped rank: old code let gloo's raw text through, naming nothing."""
    err = _epoch_failing_with(exc)
    msg = str(err)
    assert type(err).__name__ == "CollectiveTimeoutError", msg
    assert "training step 7 (epoch 1): " in msg and "a peer rank did not answer" in msg and "\n" not in msg
    train_cli = load_launch_script("train", "run_safety_train")
    assert report_error(err, debug=False, known=train_cli.KNOWN_IN_RUN) == 2
    assert capsys.readouterr().err == f"error: {msg}\n"  # as it is: no type name, no --debug hint


def test_an_error_of_this_ranks_own_step_is_not_blamed_on_a_peer():
    err = _epoch_failing_with(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)"))
    assert type(err) is RuntimeError and "shapes cannot be multiplied" in str(err)
