"""Two processes (gloo, CPU) through `accelerate launch`, against one process with the same global batch,
replicated (DDP, `--multi_gpu`) and sharded (FSDP2, `--use_fsdp --fsdp_version 2`).

Each launch runs tests/dist_worker.py, i.e. the `delrec` command itself, in every process. The
backbone is a tiny random Llama in float32 saved to a folder; the teacher is trained with dropout 0
so that one and two processes compute the same thing up to floating-point summation order.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import make_run
from delrec.teachers import default_config
from delrec.training.teacher import train_teacher
from llm_helpers import tiny_llama_backbone, tiny_t5_backbone
from test_distill import titled_dataset

WORKER = Path(__file__).with_name("dist_worker.py")
# float32 on CPU: the two-process loss is a mean of two half-batch means, summed in another order
TOLERANCE = 1e-5
STAGE1 = ["--teacher", "gru4rec", "--steps", "6", "--batch-size", "4", "--soft-tokens", "4", "--dtype", "float32",
          "--set", "valid_samples=8", "--set", "eval_every=3", "--set", "checkpoint_every=2", "--set", "warmup_steps=2",
          "--quiet"]
STAGE2 = ["--teacher", "gru4rec", "--steps", "6", "--batch-size", "4", "--dtype", "float32",
          "--set", "valid_samples=8", "--set", "eval_every=3", "--set", "checkpoint_every=2", "--set", "warmup_steps=2",
          "--set", "init_r=4", "--set", "target_r=2", "--set", "lr=0.01",
          "--set", "adapter=adalora", "--set", "optimizer=lion", "--set", "lr_schedule=constant", "--quiet"]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp, *args, processes: int = 2, check: bool = True, fsdp: bool = False) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes N dist_worker.py ARGS` (one process: plain
    python), one thread per process. `--multi_gpu` is accelerate's torchrun-based launcher, which
    on a machine without GPUs starts CPU processes on gloo (`--cpu` would start only one).
    `fsdp`: `--use_fsdp --fsdp_version 2` instead of `--multi_gpu` (the same launcher)."""
    env = {**os.environ, "HF_HOME": str(tmp / "hf"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent)}
    if processes == 1:
        cmd = [sys.executable, str(WORKER), *args]
    else:
        engine = ["--use_fsdp", "--fsdp_version", "2"] if fsdp else ["--multi_gpu"]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *engine, "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), str(WORKER), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A run with data and a GRU4Rec teacher, and a tiny Llama in a folder."""
    root = tmp_path_factory.mktemp("dist")
    run, data = make_run(root / "run", titled_dataset)
    torch.set_num_threads(1)
    train_teacher(run, default_config("gru4rec", max_epochs=2, lr=0.1, dropout=0.0), device="cpu", progress=False)
    bb = tiny_llama_backbone()
    bb.model.save_pretrained(root / "llm")
    bb.tokenizer.save_pretrained(root / "llm")
    return root, run


def _log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]


def _losses(folder: Path, key: str) -> np.ndarray:
    return np.array([e[key] for e in _log(folder) if key in e])


@pytest.fixture(scope="module")
def stage1(setup):
    """Stage 1 with one process and with two, same global batch (4 examples per task)."""
    root, run = setup
    common = ["distill", "--run", str(run), "--llm", str(root / "llm"), *STAGE1]
    launch(root, *common, "--name", "one", processes=1)
    launch(root, *common, "--name", "two", processes=2)
    return root, run


def _same_stage1(one: Path, two: Path) -> None:
    a = load_file(str(one / "soft_prompt.safetensors"))
    b = load_file(str(two / "soft_prompt.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=TOLERANCE, rtol=0)
    for key in ("loss_ta", "loss_rps", "weight_ta", "weight_rps"):
        np.testing.assert_allclose(_losses(two, key), _losses(one, key), rtol=1e-4, atol=TOLERANCE)
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert m2["trained"] == m1["trained"] and m2["untrained"] == m1["untrained"]  # sharded valid accuracy
    assert [e["eval"] for e in m2["valid_history"]] == [e["eval"] for e in m1["valid_history"]]  # and NDCG@5
    assert m2["examples_seen_per_task"] == m1["examples_seen_per_task"] == 6 * 4
    assert not (two / "checkpoint.pt").exists()


def test_stage1_two_processes_equal_one(stage1):
    _, run = stage1
    _same_stage1(run / "distill" / "one", run / "distill" / "two")


def test_stage1_two_process_run_killed_resumes(stage1):
    root, run = stage1
    common = ["distill", "--run", str(run), "--llm", str(root / "llm"), *STAGE1, "--name", "killed"]
    crashed = launch(root, "--crash-after-checkpoints", "2", *common, processes=2, check=False)
    out = run / "distill" / "killed"
    assert crashed.returncode != 0
    assert (out / "checkpoint.pt").exists() and not (out / "metrics.json").exists()
    assert max(e["step"] for e in _log(out)) == 4  # the second checkpoint was at step 4
    launch(root, *common, processes=2)
    resumed = load_file(str(out / "soft_prompt.safetensors"))
    uninterrupted = load_file(str(run / "distill" / "two" / "soft_prompt.safetensors"))
    for k in uninterrupted:
        assert torch.equal(resumed[k], uninterrupted[k])
    assert [e["step"] for e in _log(out) if "eval" not in e] == list(range(1, 7))


@pytest.fixture(scope="module")
def stage2(stage1):
    root, run = stage1
    soft = str(run / "distill" / "one" / "soft_prompt.safetensors")
    common = ["finetune", "--run", str(run), "--llm", str(root / "llm"), "--soft-prompt", soft, *STAGE2]
    launch(root, *common, "--name", "one", processes=1)
    launch(root, *common, "--name", "two", processes=2)
    return root, run, common


def _same_stage2(one: Path, two: Path) -> None:
    a = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(two / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=TOLERANCE, rtol=1e-4)
    np.testing.assert_allclose(_losses(two, "loss"), _losses(one, "loss"), rtol=1e-4, atol=TOLERANCE)
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    no_time = lambda m: [{k: v for k, v in e.items() if k != "seconds"} for e in m["valid_history"]]
    assert no_time(m2) == no_time(m1)  # valid HR@1 and NDCG@5, evaluated sharded
    assert m2["valid_rows"] == m1["valid_rows"]
    assert m2["train_examples_seen"] == m1["train_examples_seen"] == 6 * 4


def test_stage2_two_processes_equal_one(stage2):
    _, run, _ = stage2
    _same_stage2(run / "finetune" / "one", run / "finetune" / "two")


def test_stage2_two_process_run_killed_resumes(stage2):
    root, run, common = stage2
    common = [*common, "--name", "killed"]
    crashed = launch(root, "--crash-after-checkpoints", "1", *common, processes=2, check=False)
    out = run / "finetune" / "killed"
    assert crashed.returncode != 0 and (out / "checkpoint.pt").exists() and not (out / "metrics.json").exists()
    launch(root, *common, processes=2)
    resumed = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    uninterrupted = load_file(str(run / "finetune" / "two" / "adapter" / "adapter_model.safetensors"))
    for k in uninterrupted:
        assert torch.equal(resumed[k], uninterrupted[k])


@pytest.fixture(scope="module")
def fsdp(stage2):
    """Stage 1, then stage 2 from the same soft prompt as the one-process runs, on two processes
    under `accelerate launch --use_fsdp --fsdp_version 2`: the backbone's weights sharded with
    FSDP2 (each decoder layer a unit, embeddings and head in the root), trainables kept whole."""
    root, run, common2 = stage2
    launch(root, "distill", "--run", str(run), "--llm", str(root / "llm"), *STAGE1, "--name", "fsdp", fsdp=True)
    launch(root, *common2, "--name", "fsdp", fsdp=True)
    return root, run, common2


def _launch_of(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())["launch"]


def test_fsdp_stage1_equals_one_process(fsdp):
    _, run, _ = fsdp
    _same_stage1(run / "distill" / "one", run / "distill" / "fsdp")
    launch = _launch_of(run / "distill" / "fsdp")
    # tiny Llama: 2 decoder layers + the root; only the soft prompt is kept whole
    assert launch == {"processes": 2, "engine": "fsdp",
                      "sharding": {"units": 3, "tensors_sharded": launch["sharding"]["tensors_sharded"], "tensors_whole": 1}}
    assert launch["sharding"]["tensors_sharded"] > 10
    assert _launch_of(run / "distill" / "two") == {"processes": 2, "engine": "ddp"}
    assert _launch_of(run / "distill" / "one") == {"processes": 1, "engine": "single process"}


def test_fsdp_stage2_equals_one_process(fsdp):
    _, run, _ = fsdp
    _same_stage2(run / "finetune" / "one", run / "finetune" / "fsdp")
    launch = _launch_of(run / "finetune" / "fsdp")
    assert launch["engine"] == "fsdp" and launch["sharding"]["units"] == 3
    assert launch["sharding"]["tensors_whole"] > 1 and launch["sharding"]["tensors_sharded"] > 10  # adapters whole


def test_fsdp_with_gradient_checkpointing_equals_one_process(fsdp):
    """FSDP's hooks stay outside Hugging Face's per-layer checkpoint: recomputing a sharded block in
    backward gathers it again and gives the same gradients."""
    root, run, common = fsdp
    launch(root, *common, "--name", "fsdp-ckpt", "--set", "gradient_checkpointing=true", fsdp=True)
    _same_stage2(run / "finetune" / "one", run / "finetune" / "fsdp-ckpt")


def test_fsdp_encoder_decoder_equals_one_process(setup):
    """Flan-T5's architecture under FSDP: the verbalizer runs the encoder on its own, then the
    decoder once per candidate; the shared embedding sits in the root unit, every T5Block is a unit.
    Stage 1, then stage 2 from the one-process soft prompt, against one process."""
    root, run = setup
    t5 = tiny_t5_backbone()
    t5.model.save_pretrained(root / "t5")
    t5.tokenizer.save_pretrained(root / "t5")
    stage1 = ["distill", "--run", str(run), "--llm", str(root / "t5"), *STAGE1]
    launch(root, *stage1, "--name", "t5-one", processes=1)
    launch(root, *stage1, "--name", "t5-fsdp", fsdp=True)
    _same_stage1(run / "distill" / "t5-one", run / "distill" / "t5-fsdp")
    assert _launch_of(run / "distill" / "t5-fsdp")["sharding"]["units"] == 2 + 2 + 1
    soft = str(run / "distill" / "t5-one" / "soft_prompt.safetensors")
    stage2 = ["finetune", "--run", str(run), "--llm", str(root / "t5"), "--soft-prompt", soft, *STAGE2]
    launch(root, *stage2, "--name", "t5-one", processes=1)
    launch(root, *stage2, "--name", "t5-fsdp", fsdp=True)
    _same_stage2(run / "finetune" / "t5-one", run / "finetune" / "t5-fsdp")


def test_fsdp_stage2_killed_resumes(fsdp):
    root, run, common = fsdp
    common = [*common, "--name", "fsdp-killed"]
    crashed = launch(root, "--crash-after-checkpoints", "1", *common, check=False, fsdp=True)
    out = run / "finetune" / "fsdp-killed"
    assert crashed.returncode != 0 and (out / "checkpoint.pt").exists() and not (out / "metrics.json").exists()
    launch(root, *common, fsdp=True)
    resumed = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    uninterrupted = load_file(str(run / "finetune" / "fsdp" / "adapter" / "adapter_model.safetensors"))
    for k in uninterrupted:
        assert torch.equal(resumed[k], uninterrupted[k])


@pytest.mark.parametrize("env, error, match", [
    ({"ACCELERATE_USE_FSDP": "true"}, ValueError, "--fsdp_version 2"),  # accelerate's default is FSDP1
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, ValueError, "--fsdp_version 2"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, NotImplementedError, "DeepSpeed"),
])
def test_unsupported_launches_are_refused(monkeypatch, env, error, match):
    from delrec.core.distributed import _strategy_of_launch

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(error, match=match):
        _strategy_of_launch()


def test_fsdp_launch_is_recognised(monkeypatch):
    from delrec.core.distributed import _strategy_of_launch

    for k in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "FSDP_VERSION"):
        monkeypatch.delenv(k, raising=False)
    assert _strategy_of_launch() == "ddp"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert _strategy_of_launch() == "fsdp"


def test_sharded_evaluation_equals_one_process(setup):
    """Teacher (candidates and full ranking) and LLM scores, sharded over two processes: exactly
    the single-process metrics. 24 test samples with an LLM batch of 5 leave a ragged last block."""
    root, run = setup
    args = ["evaluate", "--run", str(run), "--models", "random", "popularity", "gru4rec", "--full-ranking",
            "--llm", str(root / "llm"), "--dtype", "float32", "--batch-size", "5", "--limit", "24"]
    launch(root, *args, processes=1)
    single = {p.name: json.loads(p.read_text()) for p in (run / "eval").glob("*.json")}
    shutil.rmtree(run / "eval")
    launch(root, *args, processes=2)
    double = {p.name: json.loads(p.read_text()) for p in (run / "eval").glob("*.json")}
    assert single.keys() == double.keys() and len(single) == 4
    for name in single:
        assert double[name] == single[name], name


def test_teacher_two_processes_equal_one(setup, tmp_path):
    """SASRec without dropout, global batch 64: one process and two train the same model."""
    root, _ = setup
    results = {}
    for n in (1, 2):
        run, _ = make_run(tmp_path / f"p{n}", titled_dataset)
        launch(root, "teacher", "train", "--model", "sasrec", "--run", str(run), "--device", "cpu", "--quiet",
               "--set", "max_epochs=2", "--set", "dropout=0.0", "--set", "batch_size=64", processes=n)
        results[n] = (load_file(str(run / "teachers" / "sasrec" / "model.safetensors")),
                      json.loads((run / "teachers" / "sasrec" / "metrics.json").read_text()))
    (w1, m1), (w2, m2) = results[1], results[2]
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-4, rtol=1e-3)
    assert m2["best_epoch"] == m1["best_epoch"]
    for split in ("valid", "test"):
        for section in ("candidates", "full_ranking"):
            for metric, value in m1[split][section].items():
                assert abs(m2[split][section][metric] - value) < 0.02, (split, section, metric)


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_pipeline_under_two_processes_runs_then_skips(setup, tmp_path, engine):
    """`delrec run` with every stage-1 and stage-2 variant, launched on two processes: every step
    runs once (data and report on the main process only; DDP and FSDP accept each variant's
    trainable set), the report is written, and the same launch again skips every step."""
    from test_pipeline import QUICK

    root, run = setup
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    interactions, items = titled_dataset()
    interactions.to_csv(data_dir / "interactions.csv", index=False)
    items.to_csv(data_dir / "items.csv", index=False)
    config = tmp_path / "quick.yaml"
    config.write_text(f"dataset: {data_dir}\nllm: {root / 'llm'}\nteachers: [gru4rec]\n")
    out = tmp_path / "run"
    args = ["run", "--config", str(config), "--quiet", f"run_dir={out}", *QUICK,
            "variants=[delrec, wo-sp, usp, ulsr, mcp, wo-dpsm, wo-lsr, wo-ta, wo-rps, udpsm]",
            "dtype=float32"]
    launch(root, *args, fsdp=engine == "fsdp")
    first = json.loads((out / "pipeline.json").read_text())["steps"]
    assert {s["status"] for s in first} == {"ran"} and "finetune:gru4rec-wo-sp" in {s["step"] for s in first}
    assert (out / "report.md").exists() and "## The goal" in (out / "report.md").read_text()
    before = {p: p.stat().st_mtime_ns for p in (out / "eval" / "pipeline").glob("*.json")}
    launch(root, *args, fsdp=engine == "fsdp")
    log = (out / "pipeline.log").read_text().split("pipeline ")[-1]  # the second invocation
    for step in (s["step"] for s in first if s["step"] != "report"):
        assert f"step {step}: done earlier" in log, step
    assert {p: p.stat().st_mtime_ns for p in before} == before
