"""launch/bench_attention.py on a CPU runs the interpreter smoke, prints its errors and writes JSON."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "launch" / "bench_attention.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script runs the full GPU benchmark")
def test_cpu_smoke_writes_errors_and_says_timings_need_a_gpu(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the script switches the interpreter on itself
    spec = importlib.util.spec_from_file_location("bench_attention", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Timings need a GPU" in printed
    result = json.loads(out.read_text())
    assert len(result["smoke"]) == len(bench.SMOKE)
    for case in result["smoke"]:
        errs = case["max_abs_err"]
        assert {"o", "q", "k", "v", "bank_k", "bank_v"} <= errs.keys()
        limit = 5e-3 if "float16" in case["case"] else 1e-5
        assert max(errs.values()) < limit, case
