"""A new user's first day with launch/evaluate.py on real shards: the README's commands as written, progress
while features are extracted, protocols checked against the shards, RegDB splits named by the split they
hold, one results file per dataset, and rank-list figures that say what their numbers are."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from mip_dist.config import load_config, to_dict
from mip_dist.data.shards import write_shards
from mip_dist.eval import visualize as vis
from mip_dist.eval.protocols import build_settings

from conftest import load_launch_script
from test_data_layouts import make_regdb, make_sysu

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


cli = load_launch_script("evaluate", "day_one_evaluate")


@pytest.fixture(autouse=True)
def _no_debug_env(monkeypatch):
    monkeypatch.delenv("MIP_DEBUG", raising=False)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    """Real shards of fabricated trees: SYSU-MM01 (24 test images), RegDB splits 2 and 10."""
    base = tmp_path_factory.mktemp("day_one")
    out = {"sysu": base / "sysu_shards"}
    write_shards("sysu", str(make_sysu(base / "SYSU")), str(out["sysu"]), workers=1, progress=False)
    regdb = make_regdb(base / "RegDB", splits=(2, 10))
    for split in (2, 10):
        out[f"regdb{split}"] = base / f"regdb{split}_shards"
        write_shards("regdb", str(regdb), str(out[f"regdb{split}"]), regdb_split=split, workers=1, progress=False)
    return out


def _index(folder: Path) -> dict:
    return json.loads((folder / "index.json").read_text())


def _checkpoint(path: Path, overrides: list[str], num_classes: int, num_cameras: int, datasets=None) -> Path:
    """An exported tiny model (real weights) whose saved config has `overrides`."""
    from mip_dist.model import build_model

    cfg = load_config(TINY, overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.attention, num_classes, num_cameras)
    blob = {"model": model.state_dict(), "config": to_dict(cfg), "num_classes": num_classes,
            "num_cameras": num_cameras}
    if datasets:
        blob["datasets"] = datasets
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(blob, path)
    return path


def _one_error_line(capsys, *needles: str) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    return err[0]


# ------------------------------------------------------------ 1: the README's release-checkpoint commands
@pytest.mark.parametrize("argv, protocols, shards", [
    ("--checkpoint checkpoints/sysu_converted.pt --protocol sysu sysu_authors data.shards=shards/sysu",
     ["sysu", "sysu_authors"], "shards/sysu"),
    ("--checkpoint checkpoints/regdb_converted.pt --protocol regdb data.shards=shards/regdb", ["regdb"],
     "shards/regdb"),
    ("--checkpoint checkpoints/sysu.pth --config configs/mip_vitb16_sysu_release.yaml --protocol sysu sysu_authors "
     "data.shards=shards/sysu", ["sysu", "sysu_authors"], "shards/sysu"),
])
def test_readme_overrides_after_protocol_are_overrides(argv, protocols, shards):
    args = cli.parse_args(argv.split())
    assert args.protocol == protocols and args.overrides == [f"data.shards={shards}"]


def test_readme_release_command_runs_with_the_override(tmp_path, shards, monkeypatch, capsys):
    index = _index(shards["sysu"])
    ckpt = _checkpoint(tmp_path / "checkpoints" / "sysu_converted.pt", ["data.dataset=sysu"],
                       int(index["num_classes"]), int(index["num_cameras"]))
    seen = []
    monkeypatch.setattr(cli, "evaluate_job", lambda job, *a: seen.append(job) or {})
    assert cli.main(f"--checkpoint {ckpt} --protocol sysu sysu_authors data.shards={shards['sysu']}".split()) == 0, \
        capsys.readouterr().err
    assert seen[0].cfg.eval.protocols == ["sysu", "sysu_authors"] and seen[0].cfg.data.shards == str(shards["sysu"])


# ------------------------------------------------------------ 2: progress while features are extracted
def test_evaluation_says_what_it_is_doing(tmp_path, shards, capsys):
    index = _index(shards["sysu"])
    ckpt = _checkpoint(tmp_path / "run" / "model_final.pt", ["data.dataset=sysu"], int(index["num_classes"]),
                       int(index["num_cameras"]))
    assert cli.main(["--checkpoint", str(ckpt), "--shards", str(shards["sysu"]), "--device", "cpu",
                     "eval.trials=2"]) == 0
    err = capsys.readouterr().err
    n = len(index["test_records"])
    assert f"extracting features of {n} test images" in err, err
    assert f"extracting features: {n}/{n} images (100%)" in err and "images/s" in err, err
    assert "setting 1/4 all_single (sysu): 2 trial(s)" in err, err


def test_extraction_logs_a_line_when_due(caplog):
    from mip_dist.engine.evaluator import extract_features

    class Model(torch.nn.Module):
        def extract(self, images, modality, camera):
            return torch.nn.functional.normalize(images.flatten(1), dim=1)

    batches = [{"images": torch.randn(4, 3, 2, 2), "key": [f"k{b}{i}" for i in range(4)],
                "modality": torch.zeros(4), "camera": torch.ones(4)} for b in range(3)]
    with caplog.at_level(logging.INFO, logger="mip_dist"):
        extract_features(Model(), batches, device="cpu", total=12, progress_every_s=0.0)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("extracting features: ")]
    assert [line.split(" images")[0] for line in lines] == ["extracting features: 4/12", "extracting features: 8/12",
                                                              "extracting features: 12/12"]
    assert all("images/s" in line for line in lines)


# ------------------------------------------------------------ 3: protocols that do not fit the shards
def test_protocol_that_does_not_fit_the_shards_stops_before_any_work(tmp_path, shards, monkeypatch, capsys):
    def never(*args, **kwargs):
        raise AssertionError("the protocol must be checked before the model is built")

    monkeypatch.setattr(cli, "build_and_load", never)
    monkeypatch.setattr(cli, "_init_process_group", never)
    index = _index(shards["regdb2"])
    # a tiny config (eval.protocols: [sysu]) trained on RegDB split 2
    ckpt = _checkpoint(tmp_path / "tiny_regdb.pt", ["data.dataset=regdb", "data.regdb_split=2"],
                       int(index["num_classes"]), int(index["num_cameras"]))
    assert cli.main(["--checkpoint", str(ckpt), "--shards", str(shards["regdb2"])]) == 2
    _one_error_line(capsys, "eval.protocols (saved in", "tiny_regdb.pt", "sysu cannot evaluate regdb shards",
                    "use regdb", "--protocol")
    assert cli.main(["--checkpoint", str(ckpt), "--shards", str(shards["regdb2"]), "--protocol", "llcm"]) == 2
    _one_error_line(capsys, "--protocol: llcm cannot evaluate regdb shards")


# ------------------------------------------------------------ 4: RegDB splits named by the split they hold
def _fake_split(split: int, r1: float) -> dict:
    """evaluate_features' result for one RegDB split (the fields aggregation reads)."""
    res = {"R1": r1, "R5": r1, "R10": r1, "R20": r1, "mAP": r1, "mINP": r1, "trials": 1, "cmc": [r1] * 20,
           "split": split, "headline": True,
           "description": f"RegDB visible to thermal (split {split}): all test images, no removal"}
    res.update({f"{k}_std": 0.0 for k in ("R1", "R5", "R10", "R20", "mAP", "mINP")})
    return {"visible_to_thermal": res}


def test_regdb_runs_are_named_by_their_split_and_the_mean_by_its_splits(tmp_path, shards, monkeypatch, capsys):
    from mip_dist.eval.report import aggregate_splits, splits_label

    seen = []

    def fake_job(job, args, out, world):
        seen.append(out.name)
        return _fake_split(job.split, 80.0 + job.split)

    monkeypatch.setattr(cli, "evaluate_job", fake_job)
    for split in (10, 2):  # the glob lists regdb10 before regdb2
        index = _index(shards[f"regdb{split}"])
        _checkpoint(tmp_path / f"regdb{split}" / "model_best.pt",
                    ["data.dataset=regdb", f"data.regdb_split={split}", f"data.shards={shards[f'regdb{split}']}",
                     "eval.protocols=[regdb]"], int(index["num_classes"]), int(index["num_cameras"]))
    out = tmp_path / "eval_regdb"
    assert cli.main(["--runs", str(tmp_path / "regdb*"), "--out", str(out)]) == 0
    assert seen == ["split02_regdb2", "split10_regdb10"]
    assert "== mean ± std over splits 2, 10 (n=2)" in capsys.readouterr().out
    doc = json.loads((out / "results.json").read_text())
    agg = doc["aggregate"]["visible_to_thermal"]
    assert agg["split_numbers"] == [2, 10] and "split 2" not in agg["description"]
    assert agg["description"].endswith("; mean over splits 2, 10 (n=2)")
    assert splits_label(list(range(1, 11))) == "mean over splits 1-10 (n=10)"
    ten = aggregate_splits([_fake_split(s, 80.0) for s in range(1, 11)], splits_label(list(range(1, 11))))
    assert ten["visible_to_thermal"]["description"] == ("RegDB visible to thermal: all test images, no removal; "
                                                        "mean over splits 1-10 (n=10)")


def test_regdb_results_record_their_split():
    from mip_dist.engine.evaluator import evaluate_features

    records = [{"key": f"{m}{p}", "pid": p, "camera": 1 + m, "modality": m, "path": f"{m}/{p}.bmp"}
               for p in range(3) for m in (0, 1)]
    feats = torch.randn(len(records), 8, generator=torch.Generator().manual_seed(0))
    res = evaluate_features(feats, [r["key"] for r in records], {"dataset": "regdb", "regdb_split": 7,
                                                                 "test_records": records}, ["regdb"])
    assert res["visible_to_thermal"]["split"] == 7 and "(split 7)" in res["visible_to_thermal"]["description"]


# ------------------------------------------------------------ 5: one results file per dataset
def test_two_datasets_of_one_model_keep_their_own_results(tmp_path, shards, capsys):
    sysu, regdb = _index(shards["sysu"]), _index(shards["regdb2"])
    cams = int(sysu["num_cameras"]) + int(regdb["num_cameras"])
    datasets = [{"name": "sysu", "path": str(shards["sysu"]), "protocol": "sysu", "dataset": "sysu",
                 "camera_offset": 0, "num_cameras": int(sysu["num_cameras"])},
                {"name": "regdb", "path": str(shards["regdb2"]), "protocol": "regdb", "dataset": "regdb",
                 "camera_offset": int(sysu["num_cameras"]), "num_cameras": int(regdb["num_cameras"])}]
    ckpt = _checkpoint(tmp_path / "run" / "model_final.pt", [], int(sysu["num_classes"]) + int(regdb["num_classes"]),
                       cams, datasets)
    for name in ("sysu", "regdb"):
        assert cli.main(["--checkpoint", str(ckpt), "--dataset", name, "--device", "cpu", "eval.trials=1"]) == 0, \
            capsys.readouterr().err
    out = tmp_path / "run" / "eval"
    first = json.loads((out / "results_sysu.json").read_text())
    second = json.loads((out / "results_regdb.json").read_text())
    assert "all_single" in first["results"] and "visible_to_thermal" in second["results"]
    assert (out / "cmc_sysu.png").is_file() and (out / "cmc_regdb.png").is_file()
    assert not (out / "results.json").exists()


# ------------------------------------------------------------ 6: rank-list figures that say what they show
def _texts(fig) -> list[str]:
    """Every text matplotlib was given: the title, the header lines and each cell's title."""
    return [fig.get_suptitle()] + [t.get_text() for t in fig.texts] + [ax.get_title() for ax in fig.axes]


def test_rank_list_cells_name_modality_camera_and_cosine_with_enough_digits():
    gallery = [{"key": f"g{i}", "pid": 5 if i == 0 else 9, "camera": 1 + i % 2, "modality": 1,
                "distance": -0.99991 + 0.00002 * i, "same": i == 0} for i in range(4)]
    entry = {"key": "q", "pid": 5, "camera": 3, "modality": 0, "ap": 1.0, "gallery": gallery}
    images = {k: {"image": torch.zeros(3, 16, 8)} for k in ["q"] + [g["key"] for g in gallery]}
    texts = _texts(vis.rank_list_figure([entry], images, title="all_single", subtitle="queries: infrared", top=4))
    assert "QUERY id 5\nIR cam3\nAP 1.00" in texts
    cells = [t for t in texts if t.startswith("#")]
    assert cells[0] == "#1 id 5\nVIS cam1\ncos 0.99991" and cells[1] == "#2 id 9\nVIS cam2\ncos 0.99989"
    assert len({c.rsplit("cos ", 1)[1] for c in cells}) == 4  # neighbours differ at the digits shown
    assert any("cos = cosine similarity" in t and "higher = closer" in t for t in texts)
    assert not any("d=" in t for t in texts)


def test_one_rank_list_figure_per_setting_and_the_role_swap_is_explained(tmp_path, monkeypatch):
    records = [{"key": f"{p}_{c}_{n}", "pid": p, "camera": c, "modality": 1 if c <= 2 else 0,
                "path": f"c{c}/{p}/{n}.jpg"} for p in range(1, 4) for c in (1, 2, 3, 4) for n in range(2)]
    feats = torch.randn(len(records), 8, generator=torch.Generator().manual_seed(0))
    row = {r["key"]: i for i, r in enumerate(records)}
    settings = build_settings({"dataset": "llcm", "test_records": records}, ["llcm"], trials=1)
    lists = {s.name: vis.rank_lists(feats, row, records, s, num_queries=2) for s in settings}
    images = {r["key"]: {"image": torch.zeros(3, 16, 8)} for r in records}
    subtitles = {}
    draw = vis.plot_rank_lists

    def spy(entries, imgs, path, title="", top=vis.RANK_LIST_TOP, subtitle=""):
        subtitles[Path(path).name] = (title, subtitle)
        if Path(path).name != "ranklist_llcm_visible_to_infrared.png":  # one drawn is enough here
            return Path(path)
        return draw(entries, imgs, path, title=title, top=top, subtitle=subtitle)

    monkeypatch.setattr(vis, "plot_rank_lists", spy)
    written = vis.rank_list_figures(lists, images, settings, records, tmp_path, prefix="llcm_")
    assert sorted(p.name for p in written) == sorted(
        f"{kind}_llcm_{name}.png" for kind in ("ranklist", "worst_ap")
        for name in ("infrared_to_visible", "visible_to_infrared", "visible_to_infrared_literal"))
    title, swapped = subtitles["ranklist_llcm_visible_to_infrared.png"]
    assert title.startswith("visible_to_infrared: sample queries (trial 0, seed 0)")
    assert "queries: 6 infrared images; gallery: 12 visible images" in swapped and "Roles swapped" in swapped
    assert "Roles swapped" not in subtitles["ranklist_llcm_infrared_to_visible.png"][1]
    assert "not comparable" in subtitles["worst_ap_llcm_visible_to_infrared_literal.png"][1]
    assert (tmp_path / "ranklist_llcm_visible_to_infrared.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
