"""Kernel tests in any order on a CUDA machine: CPU-device Triton cases skip where the kernels run compiled.

Triton fixes compiled vs interpreted for a whole process when the kernels are first imported. A CPU-only
session interprets (tests/conftest.py sets TRITON_INTERPRET=1 first); a CUDA session runs them compiled
on the GPU, so its CPU-device Triton cases (which need the interpreter) skip via `skip_unless_cpu_kernels`,
called before a test sets TRITON_INTERPRET: they neither raise nor import the kernels interpreted under
the GPU cases. The proof runs those cases in a child pytest with CUDA faked, in both orders.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mip_dist.kernels import triton_available
from mip_dist.kernels._backend import interpreter_defect, triton_unavailable_reason

TESTS = Path(__file__).resolve().parent
CPU_RUN = "run them with CUDA_VISIBLE_DEVICES= for a CPU-only, interpreted session"


def skip_unless_cpu_kernels() -> None:
    """Skip a CPU-device Triton case in a CUDA process (its kernels are, or will be, compiled for the GPU),
    or where this triton's interpreter cannot run them (`interpreter_defect`: triton < 3.7 with NumPy 2.4).

    Call it before setting TRITON_INTERPRET: with the variable unset the check imports no kernels, so a
    CPU case that runs first cannot leave the GPU cases with interpreted kernels."""
    defect = interpreter_defect() if triton_available() else None
    if defect is not None:
        pytest.skip(f"CPU-device Triton case: {defect}")
    if not torch.cuda.is_available():
        return
    reason = triton_unavailable_reason(torch.device("cpu"))
    if reason is not None:
        pytest.skip(f"CPU-device Triton case in a CUDA process ({reason}); {CPU_RUN}")


# Loaded with -p before tests/conftest.py: CUDA looks present, so conftest leaves TRITON_INTERPRET unset,
# as on a GPU machine; with COMPILED_FIRST the kernels are imported compiled before any test, as when
# the GPU cases of test_kernel_attention.py run first. Outcomes and the final mode go to a JSON file.
PLUGIN = '''
import json, os, sys
import torch

os.environ.pop("TRITON_INTERPRET", None)
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
from mip_dist.kernels import _backend

if os.environ["COMPILED_FIRST"] == "1":
    _backend.kernel_module()
    assert not _backend.interpreted(), "the plugin meant to import the kernels compiled"
OUTCOMES = []


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        reason = report.longrepr[2] if report.skipped and isinstance(report.longrepr, tuple) else ""
        OUTCOMES.append([report.nodeid, report.when, report.outcome, reason])


def pytest_sessionfinish(session, exitstatus):
    imported = "mip_dist.kernels._triton_attention" in sys.modules
    mode = ("compiled" if not _backend.interpreted() else "interpreted") if imported else "not imported"
    with open(os.environ["OUTCOMES_JSON"], "w") as f:
        json.dump({"outcomes": OUTCOMES, "mode": mode}, f)
'''

# The CPU-device Triton cases of the kernel test files (the GPU ones need a real device: deselected)
CPU_CASES = ["test_kernel_model.py", "test_kernel_dispatch.py",
             "test_gpu_path.py::test_model_loss_and_kernel_make_no_host_syncs", "test_kernel_attention.py"]
NEEDS_A_GPU = "not cuda and not test_gpu_grid_bf16_and_larger"


def run_with_fake_cuda(tmp_path: Path, compiled_first: bool) -> dict:
    """Outcomes of CPU_CASES in a child pytest that believes CUDA is present."""
    (tmp_path / "fake_cuda_first.py").write_text(PLUGIN)
    out = tmp_path / "outcomes.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=os.pathsep.join(p for p in (str(tmp_path), env.get("PYTHONPATH", "")) if p),
               COMPILED_FIRST="1" if compiled_first else "0", OUTCOMES_JSON=str(out))
    args = [sys.executable, "-m", "pytest", "-q", "-p", "fake_cuda_first", "-p", "no:cacheprovider",
            "-k", NEEDS_A_GPU, *(str(TESTS / c) for c in CPU_CASES)]
    r = subprocess.run(args, cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=240)
    assert out.exists(), r.stdout[-3000:] + r.stderr[-3000:]
    return {**json.loads(out.read_text()), "returncode": r.returncode, "log": r.stdout[-3000:]}


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("compiled_first", [True, False], ids=["compiled-import-first", "cpu-cases-first"])
def test_cpu_kernel_cases_skip_cleanly_in_a_cuda_process(tmp_path, compiled_first):
    """With CUDA present, the CPU-device Triton cases skip with the reason instead of raising ValueError
    ('imported compiled'), and running them never leaves the kernels imported interpreted."""
    got = run_with_fake_cuda(tmp_path, compiled_first)
    outcomes = got["outcomes"]
    bad = [o for o in outcomes if o[2] not in ("passed", "skipped")]
    assert not bad and got["returncode"] == 0, (bad, got["log"])
    why = interpreter_defect() or CPU_RUN  # the child checks the interpreter's defect first
    for name in ("test_tiny_model_triton_matches_concat[cpu", "test_explicit_scale_is_used",
                 "test_forced_triton_runs_interpreted_on_cpu", "test_model_loss_and_kernel_make_no_host_syncs[triton]",
                 "test_empty_dimensions", "test_the_interpreter_launches_the_fixed_config"):
        cases = [o for o in outcomes if f"::{name}" in o[0]]
        assert cases and all(o[2] == "skipped" and why in o[3] for o in cases), (name, cases)
    torch_cases = [o for o in outcomes if "make_no_host_syncs[torch]" in o[0] or "auto_on_cpu" in o[0]]
    assert len(torch_cases) == 2 and all(o[2] == "passed" for o in torch_cases), torch_cases
    # never interpreted: the launch-grid tests of test_kernel_attention.py import the kernels as a GPU run would
    assert got["mode"] == "compiled", got["mode"]
