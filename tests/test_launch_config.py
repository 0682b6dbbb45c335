"""launch/train.py argument handling, DeepSpeed config files, and bad configs failing before any process group."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mip_dist.config import ConfigError, load_config
from mip_dist.engine.ds_config import build_ds_config, load_ds_config
from mip_dist.engine.ds_config import main as ds_config_main

REPO = Path(__file__).resolve().parent.parent
DS_JSONS = sorted((REPO / "configs" / "deepspeed").glob("*.json"))
PAPER = REPO / "configs" / "mip_vitb16_sysu.yaml"
PG_STARTED = "backend gloo"  # logged by init_distributed once the process group is up


def _train(args, env_extra=None, timeout=120):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_one_deepspeed_example_per_zero_stage_is_what_the_trainer_builds(capsys):
    assert [p.name for p in DS_JSONS] == [f"zero{s}.json" for s in range(4)]
    for stage, path in enumerate(DS_JSONS):
        assert ds_config_main(["--config", str(PAPER), f"train.zero_stage={stage}"]) == 0
        assert json.loads(path.read_text()) == json.loads(capsys.readouterr().out), f"regenerate {path.name}"
        assert '"auto"' not in path.read_text(), path


@pytest.mark.parametrize("path", DS_JSONS, ids=lambda p: p.stem)
def test_deepspeed_example_fills_in_what_it_leaves_out_from_the_config(path):
    cfg = load_config(PAPER, [f"train.zero_stage={path.stem[4]}", f"train.deepspeed_config={path}"])
    assert load_ds_config(cfg, world_size=4) == build_ds_config(cfg, world_size=4)  # train_batch_size 64 x 4


def test_deepspeed_json_adds_tuning_keys_to_the_built_config(tmp_path):
    cfg = load_config(PAPER, ["train.zero_stage=3"])
    ds = build_ds_config(cfg, 2)
    del ds["train_batch_size"], ds["data_types"]
    ds["zero_optimization"]["stage3_max_live_parameters"] = 1000
    ds["data_types"] = {"buffer_dtype": "bfloat16"}
    (tmp_path / "mine.json").write_text(json.dumps(ds))
    cfg = load_config(PAPER, ["train.zero_stage=3", f"train.deepspeed_config={tmp_path / 'mine.json'}"])
    got = load_ds_config(cfg, 2)
    assert got["zero_optimization"]["stage3_max_live_parameters"] == 1000
    assert got["data_types"] == {"buffer_dtype": "bfloat16"} and got["train_batch_size"] == 128


def test_ds_config_command_names_a_bad_key(capsys):
    assert ds_config_main(["train.zero_stage=5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: train.zero_stage: 5") and "\n" not in err


def test_deepspeed_json_disagreeing_with_config_fails_clearly(tmp_path):
    zero0 = REPO / "configs" / "deepspeed" / "zero0.json"
    cfg = load_config(PAPER, ["data.batch_size=32", f"train.deepspeed_config={zero0}"])
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=64.*data.batch_size"):
        load_ds_config(cfg, 2)
    cfg = load_config(PAPER, ["train.zero_stage=2", f"train.deepspeed_config={zero0}"])
    with pytest.raises(ConfigError, match="ZeRO stage 1 but train.zero_stage=2"):
        load_ds_config(cfg, 2)
    fp16 = tmp_path / "fp16.json"
    fp16.write_text(json.dumps(build_ds_config(load_config(PAPER, ["train.precision=fp16"]), 2)))
    cfg = load_config(PAPER, [f"train.deepspeed_config={fp16}"])
    with pytest.raises(ConfigError, match="trains in fp16 but train.precision=bf16"):
        load_ds_config(cfg, 2)
    no_buffers = tmp_path / "no_buffers.json"
    no_buffers.write_text(json.dumps({"train_micro_batch_size_per_gpu": 64, "gradient_clipping": 5.0,
                                      "bf16": {"enabled": True}}))
    cfg = load_config(PAPER, [f"train.deepspeed_config={no_buffers}"])
    with pytest.raises(ConfigError, match="keeps buffers in fp32.*data_types.buffer_dtype='bf16'"):
        load_ds_config(cfg, 2)
    bad = tmp_path / "auto.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": 1.0}))
    cfg = load_config(PAPER, [f"train.deepspeed_config={bad}"])
    with pytest.raises(ConfigError, match="'auto' values.*train_micro_batch_size_per_gpu"):
        load_ds_config(cfg, 1)
    owner = tmp_path / "owner.json"
    owner.write_text(json.dumps({"train_micro_batch_size_per_gpu": 64, "gradient_clipping": 5.0,
                                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}))
    cfg = load_config(PAPER, [f"train.deepspeed_config={owner}"])
    with pytest.raises(ConfigError, match="defines optimizer"):
        load_ds_config(cfg, 1)
    cfg = load_config(PAPER, ["train.grad_accum=2", "optim.grad_clip=1.0"])
    built = build_ds_config(cfg, 3)
    assert built["train_batch_size"] == 64 * 2 * 3 and built["gradient_clipping"] == 1.0


def test_bad_override_fails_before_process_group(tmp_path):
    r = _train(["--config", "configs/tiny.yaml", "model.num_heads=5", f"train.output_dir={tmp_path}"])
    assert r.returncode == 2, r.stderr
    assert "model.embed_dim" in r.stderr and "num_heads=5" in r.stderr
    assert PG_STARTED not in r.stderr + r.stdout
    assert not any(tmp_path.iterdir())


def test_missing_shards_fail_before_process_group(tmp_path):
    # a real dataset: the synthetic one would be generated on demand
    r = _train(["--config", "configs/tiny.yaml", "data.dataset=sysu", f"data.shards={tmp_path}/nowhere",
                f"train.output_dir={tmp_path}"])
    assert r.returncode == 2 and "data.shards" in r.stderr and "index.json" in r.stderr, r.stderr
    assert PG_STARTED not in r.stderr + r.stdout


def test_bad_config_under_deepspeed_launcher_fails_on_every_rank(tmp_path):
    """Both ranks exit with the config error at once: neither reaches the process-group rendezvous."""
    from mip_dist.engine.distributed import free_port

    launcher = Path(sys.executable).parent / "deepspeed"
    r = subprocess.run([str(launcher), "--num_gpus", "2", "--master_port", str(free_port()),
                        str(REPO / "launch" / "train.py"), "--config", "configs/tiny.yaml",
                        "train.zero_stage=7", f"train.output_dir={tmp_path}"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "train.zero_stage" in out and PG_STARTED not in out


def test_unknown_config_file_and_no_demo_config(tmp_path):
    r = _train(["--config", str(tmp_path / "missing.yaml")])
    assert r.returncode == 2 and "config file not found" in r.stderr
    sys.path.insert(0, str(REPO / "launch"))
    try:
        import train as train_entry
    finally:
        sys.path.pop(0)
    args = train_entry.parse_args(["--local_rank=1", "--resume", "auto", "optim.lr=0.1"])
    assert args.local_rank == 1 and args.resume == "auto" and args.overrides == ["optim.lr=0.1"]
    assert train_entry.parse_args([]).config is None  # optional: defaults to the demo config
    assert train_entry.DEMO_CONFIG.is_file() and train_entry.ABLATION_CONFIG.is_file()


def test_bad_srun_variable_fails_in_one_line_before_anything_else(tmp_path):
    """Under srun the SLURM variables are read first: a bad one is named before the config is even checked."""
    srun = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "x", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0",
            "SLURM_JOB_ID": "5", "SLURM_JOB_NODELIST": "localhost"}
    r = _train(["--config", "configs/tiny.yaml", "model.num_heads=5", f"train.output_dir={tmp_path}"], srun)
    assert r.returncode == 2 and r.stderr.strip() == "error: SLURM_PROCID='x' is not an integer", r.stderr
    assert not any(tmp_path.iterdir())
