"""The GPU session's CPU side (docs/gpu.md): the throughput benchmark's smoke mode, the session
script's commands (--dry-run) and the progress summary of a run folder."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_progress  # noqa: E402
import gpu_throughput  # noqa: E402


def _throughput(tmp_path, *extra) -> tuple[int, dict]:
    out = tmp_path / "t.json"
    rc = gpu_throughput.main(["--device", "cpu", "--tiny", "--models", "smollm2-135m", "--requests", "6",
                              "--batch-sizes", "2", "3", "--check-requests", "4", "--out", str(out), *extra])
    return rc, json.loads(out.read_text())


def test_throughput_smoke_on_cpu(tmp_path):
    rc, result = _throughput(tmp_path)
    assert rc == 0 and result["complete"] and result["all_equal_within_tolerance"]
    assert result["gpu"] is None and result["settings"]["peak_tflops"] == gpu_throughput.DEFAULT_PEAK_TFLOPS
    assert "H100" in result["settings"]["peak_name"] and result["settings"]["measured_matmul"]["tflops"] > 0
    rows = result["rows"]
    assert [(r["scorer"], r["batch_size"]) for r in rows] == [
        ("ours full-title", 2), ("ours first-token", 2), ("ours full-title", 3), ("ours first-token", 3),
        ("plain HF loop full-title", None)]
    for r in rows:
        assert r["requests"] == 6 and r["requests_per_s"] > 0
        assert r["flop_per_request"] > 0 and 0 < r["fraction_of_peak"] < 1
        assert r["max_abs_diff"] <= r["tolerance"] == gpu_throughput.TOLERANCE  # float32: 1e-4
    # a full-title request costs more than a first-token one: the 15 titles' tokens
    assert rows[0]["flop_per_request"] > rows[1]["flop_per_request"]
    fastest = result["models"]["smollm2-135m"]["fastest"]
    assert fastest["ours full-title"]["batch_size"] in (2, 3)
    assert fastest["ours full-title"]["requests_per_s"] == max(r["requests_per_s"] for r in rows if r["scorer"] == "ours full-title")


def test_throughput_catches_scores_off_the_reference(tmp_path, monkeypatch):
    from delrec.llm.verbalizer import Verbalizer

    score = Verbalizer.score
    monkeypatch.setattr(Verbalizer, "score", lambda self, prompts, soft=None: [s + 1e-3 for s in score(self, prompts, soft)])
    rc, result = _throughput(tmp_path)
    assert rc == 1 and not result["all_equal_within_tolerance"]
    assert [r["equal_within_tolerance"] for r in result["rows"]] == [False] * 4 + [True]


def _dry_run(*args) -> str:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "benchmarks/run_gpu.sh", "--dry-run", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_session_script_dry_run_prints_the_session_in_order(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")  # what gpu_weights.py split leaves with the parts
    out = _dry_run("--time-limit", "540", "--transfer", str(tmp_path), "--", "finetune.eval_every=100")
    order = [f"gpu_weights.py join --dir {tmp_path}", "gpu_throughput.py --models smollm2-135m",
             "-m delrec.cli run --config configs/ml100k-gpu.yaml --quiet", "gpu_progress.py runs/ml100k-gpu",
             "run-state.tgz"]
    at = [out.find(s) for s in order]
    assert all(i >= 0 for i in at) and at == sorted(at), out
    run_line = next(line for line in out.splitlines() if "delrec.cli run" in line)
    limit = int(re.search(r"timeout -s TERM -k 20 (\d+) ", run_line).group(1))
    assert 400 < limit <= 540 - 60  # the time limit less the reserve for packing (a dry run spends seconds only)
    assert "wo-ta" in run_line and "llmseqsim" in run_line and "udpsm" not in run_line  # w UDPSM left out by default
    assert run_line.endswith("finetune.eval_every=100")
    assert "timeout -s TERM -k 15 240" in out  # the throughput benchmark's own limit


def test_session_script_without_carried_weights_skips_the_join(tmp_path):
    out = _dry_run("--transfer", str(tmp_path / "absent"))
    assert "nothing carried to join" in out and "gpu_weights.py join" not in out
    assert "delrec.cli run --config configs/ml100k-gpu.yaml" in out  # delrec's cache may hold them already


def test_session_script_benchmarks_mode():
    out = _dry_run("--benchmarks")
    assert "gpu_memory.py" in out and "stages.py --device cuda" in out and "delrec.cli run" not in out


def test_progress_of_a_run_folder(tmp_path):
    from delrec.config import PipelineConfig

    config = PipelineConfig.from_file(ROOT / "configs" / "ml100k-gpu.yaml", [f"run_dir={tmp_path}", "variants=[delrec, wo-sp]"])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(asdict(config)))
    stage1 = tmp_path / "distill" / "sasrec"
    stage1.mkdir(parents=True)
    lines = [{"step": 0, "seconds": 0.0, "wall_seconds": 5.0, "eval": {}}] + [{"step": i, "loss_ta": 2.0, "seconds": 2.0 * i}
                                                                                 for i in range(1, 11)]
    (stage1 / "train_log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines) + '{"step": 11, "lo')  # cut by a kill
    done = tmp_path / "finetune" / "sasrec-delrec"
    done.mkdir(parents=True)
    (done / "metrics.json").write_text(json.dumps({"steps": 100, "seconds": 50.0, "wall_seconds": 60.0}))
    (tmp_path / "eval" / "pipeline").mkdir(parents=True)
    (tmp_path / "eval" / "pipeline" / "zero-shot.json").write_text(json.dumps({"num_samples": 200, "seconds": 20.0}))
    (tmp_path / "pipeline.log").write_text("x INFO delrec.pipeline: step teacher:sasrec: finished in 61 s\n")

    result = gpu_progress.progress(tmp_path)
    by = {s["folder"]: s for s in result["stages"]}
    s1 = by["distill/sasrec"]
    assert (s1["status"], s1["steps_done"], s1["seconds_per_step"]) == ("started", 10, 2.0)
    assert s1["examples_per_s"] == pytest.approx(10 * 16 * 2 / 20.0)  # 16 per task, two tasks
    assert s1["projected_seconds_left"] == pytest.approx((4918 - 10) * 2.0 * 1.2)  # at its own rate, x the wall factor
    assert by["finetune/sasrec-delrec"]["status"] == "done" and by["finetune/sasrec-delrec"]["examples_per_s"] == 32.0
    wo_sp = by["finetune/sasrec-wo-sp"]
    assert wo_sp["status"] == "not started"
    assert wo_sp["projected_seconds_left"] == pytest.approx(4918 * 16 / 32.0 * 1.2)  # at delrec's measured rate
    evals = {e["model"]: e for e in result["evaluations"]}
    assert evals["zero-shot"]["status"] == "done" and evals["sasrec-delrec"]["projected_seconds"] == pytest.approx(20.0)
    assert result["pipeline_steps_seconds"] == {"teacher:sasrec": 61}
    assert result["not_projected"] == []
