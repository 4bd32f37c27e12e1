"""tools/gpu_check.sh on a machine without a GPU: it must exit cleanly, inside its budget, with summary.json
and at most 8 files (the GPU machine returns no more), the CUDA/Triton test stages having run (and skipped;
without triton installed, the Triton tests skip as a module, naming the missing package)."""
import importlib.util
import json
import os
import xml.etree.ElementTree as ET
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path; on a GPU machine run the script itself")
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and coreutils timeout")
def test_gpu_check_without_a_gpu_exits_cleanly(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "GPU_CHECK_SKIP_BUILD": "1",
           "GPU_CHECK_SECONDS": "400"}
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files
    assert {"summary.json", "gpu_check.log", "artifacts.tar.gz"} <= set(files), files
    s = json.loads((out / "summary.json").read_text())
    stages = {x["stage"]: x["rc"] for x in s["stages"]}
    assert stages["build"].startswith("skipped") and stages["bench: model"].startswith("skipped")
    assert stages["tests: cuda kernels"] in ("0", "5") and stages["tests: triton kernels"] in ("0", "5")
    assert s["ok"] is True and "gpu none" in " ".join(s["env"])
    # the GPU selections are what they claim: the CUDA stage runs the CUDA kernels' tests, the Triton stage
    # the real-size bf16/fp16 Triton tests and the Triton known-answer checks (no fp32 compiles)
    names = {st: [f"{c.get('classname')}::{c.get('name')}" for c in ET.parse(out / f"junit_{st}.xml").getroot().iter("testcase")]
             for st in ("cuda", "triton")}
    assert any("test_attention_cuda_matches_reference" in n for n in names["cuda"])
    assert any("known_answer_on_gpu[cuda" in n for n in names["cuda"])
    assert not any("triton" in n for n in names["cuda"])
    assert sum("known_answer_on_gpu[triton" in n for n in names["triton"]) == 6
    assert not any("fp32" in n for n in names["triton"])
    if importlib.util.find_spec("triton") is not None:
        assert any("test_gpu_values_and_grads" in n for n in names["triton"])
    else:  # the CPU-only install: the Triton test module skips as a whole, and says it is for want of triton
        skips = [c.find("skipped") for c in ET.parse(out / "junit_triton.xml").getroot().iter("testcase")
                 if "test_triton_attention" in f"{c.get('classname')}::{c.get('name')}"]
        why = [None if sk is None else f"{sk.get('message', '')} {sk.text or ''}" for sk in skips]
        assert why and all(w is not None and "triton is not installed" in w for w in why), why
    assert "summary: OK" in r.stdout.strip().splitlines()[-1]
