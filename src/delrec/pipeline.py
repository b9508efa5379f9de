"""`delrec run --config CONFIG`: the whole DELRec experiment in order, resumable.

Steps: data (fetch + prepare) -> teacher:<t> -> distill:<t> (and stage-1 ablations) ->
finetune:<t>-<method> -> eval:<model> (every model on one fixed seeded subset of test samples)
[-> eval-full:<model> (over the whole catalogue, when the config has `full_ranking:`)
-> eval-orders:<model> (the LLM models with their candidates in other orders, `candidate_orders:`)]
-> report. A step whose outputs exist and were made with the same settings is skipped, so running
the same command again after an interruption continues where it stopped (the training stages
also resume from their own checkpoints). A changed setting reruns that step and every step that
depends on it.

RUN/pipeline.log        the log of every invocation
RUN/pipeline.json       per step: ran or skipped, wall seconds, peak resident memory
RUN/config.yaml         the resolved configuration of the last invocation
RUN/eval/pipeline/      one JSON per model: metrics, the sample rows, each sample's rank and top-1
                        (and full-catalogue/, orders/: the same models' other evaluations)
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import resource
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import yaml

from delrec import methods
from delrec.config import PipelineConfig
from delrec.core import distributed, tracking
from delrec.core.io import atomic_path, read_json, write_json
from delrec.core.layout import RunLayout
from delrec.core.locks import run_lock
from delrec.core.names import ModelName
from delrec.core.settings import same_identity
from delrec.data.loaders import load_dataset
from delrec.data.protocol import ProtocolConfig, prepare
from delrec.data.store import RunData, holds_same_data, write
from delrec.evaluation.metrics import candidate_outcomes, full_ranks, metrics_from_ranks, subset_rows
from delrec.evaluation.orders import order_outcomes, order_summary
from delrec.evaluation.two_stage import two_stage_ranks
from delrec.report.writer import write_report
from delrec.serving.scorers import make_scorer
from delrec.teachers import MODELS as TEACHERS
from delrec.teachers import default_config
from delrec.teachers.base import TeacherConfig
from delrec.teachers.lists import stored_top_h
from delrec.teachers.retrieval import RetrieveThenRank
from delrec.training.config import DistillConfig, FinetuneConfig
from delrec.training.distill import distill
from delrec.training.finetune import finetune
from delrec.training.teacher import train_teacher

log = logging.getLogger("delrec.pipeline")


class _PeakMemory:
    """Peak resident memory of this process while a step runs (sampled from /proc, Linux)."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def _same(recorded, wanted) -> bool:
    """Settings equal once both went through JSON (tuples become lists). Settings of a config
    class are compared with delrec.core.settings.same_identity instead (runtime fields ignored)."""
    return json.loads(json.dumps(recorded)) == json.loads(json.dumps(wanted))


def _recorded(path: Path, settings: dict) -> bool:
    """Whether an evaluation file holds a result made with `settings` (its scoring batch size aside)."""
    recorded = read_json(path).get("settings") if path.exists() else None
    return recorded is not None and _same({k: v for k, v in recorded.items() if k != "batch_size"}, settings)


def _fingerprint(path: Path) -> str | None:
    """A short hash of a step's completion file: downstream steps rerun when it changes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.exists() else None


class Pipeline:
    def __init__(self, config: PipelineConfig, progress: bool = True):
        self.config = config
        self.run = Path(config.run_dir)
        self.layout = RunLayout(self.run)
        self.progress = progress
        self.steps: list[dict] = []
        self.started = time.perf_counter()
        # the last real run of every step, across invocations (a skipped step keeps its earlier time)
        summary = self.layout.pipeline_summary
        self.earlier = {e["step"]: e for e in read_json(summary)["steps"] if e["status"] == "ran"} if summary.exists() else {}

    # -- bookkeeping -------------------------------------------------------------------------

    def _step(self, name: str, done: bool, fn, main_only: bool = False) -> None:
        """Run `fn` unless `done`. Under a multi-process launch every process runs it (the stages
        are data-parallel) unless `main_only`, and all wait for each other afterwards, so the
        next step's skip decision reads finished files. Memory is the main process's."""
        dist = distributed.current()
        if done:
            log.info("step %s: done earlier with the same settings, skipped", name)
            before = self.earlier.get(name, {})
            self.steps.append({"step": name, "status": "skipped", "seconds": before.get("seconds"),
                               "peak_rss_mb": before.get("peak_rss_mb")})
            return
        log.info("step %s: running", name)
        t0 = time.perf_counter()
        with _PeakMemory() as mem:
            if dist.is_main or not main_only:
                fn()
            dist.barrier()
        gc.collect()
        entry = {"step": name, "status": "ran", "seconds": round(time.perf_counter() - t0, 1),
                 "peak_rss_mb": round(mem.peak / 2**20)}
        log.info("step %s: finished in %.0f s, peak memory %d MiB", name, entry["seconds"], entry["peak_rss_mb"])
        self.steps.append(entry)
        self._write_summary(final=False)  # a killed invocation keeps what ran

    def _llm_settings(self) -> dict:
        c = self.config
        return {"llm": c.llm, "dtype": c.dtype, "device": c.device}

    # -- steps -------------------------------------------------------------------------------

    def data(self) -> None:
        c = self.config
        proto = ProtocolConfig.for_protocol(**c.protocol) if c.protocol else ProtocolConfig()
        marker = self.layout.data / "protocol.json"
        if marker.exists() and not holds_same_data(self.layout.data, proto, c.dataset):
            written = read_json(marker)
            raise ValueError(f"{self.layout.data} was prepared from {written['source'].get('dataset')} with "
                             f"{written['protocol']}, not as this config asks; use another run_dir")

        def prepare_data():
            raw = load_dataset(c.dataset)
            write(prepare(raw.interactions, raw.items, proto, read=raw.source.get("read")), self.layout.data, source={"dataset": c.dataset, **raw.source})

        self._step("data", marker.exists(), prepare_data, main_only=True)

    def teachers(self) -> None:
        for name in self.config.teachers:
            model = TEACHERS.get(name)
            own = {"llm": self.config.llm} if getattr(model, "reads_llm", False) else {}  # LLM2BERT4Rec, KDALRD
            tc = default_config(name, **{**self.config.teacher, **own})
            out = self.layout.teacher(name)
            lists = (out / "topk.parquet").exists() and stored_top_h(out / "topk.parquet") == self.config.top_h
            done = (out / "metrics.json").exists() and (lists or not getattr(model, "writes_lists", True)) and \
                same_identity(TeacherConfig, read_json(out / "config.json")["teacher"], asdict(tc))
            self._step(f"teacher:{name}", done, lambda tc=tc: train_teacher(
                self.run, tc, device=self.config.device, top_h=self.config.top_h, progress=self.progress))

    def _distill_config(self, teacher: str, method: str | None = None):
        own = methods.get(method).stage1_settings if method else {}
        settings = {**self._llm_settings(), "templates": self.config.templates, **self.config.distill, "teacher": teacher, **own}
        return DistillConfig(**settings)

    def distill(self) -> None:
        wanted = []  # (teacher, RUN/distill/ folder, the method with its own stage 1 or None)
        chosen = [methods.get(v) for v in self.config.methods]
        for t in self.config.llm_teachers:
            if any(m.stage1 == "shared" for m in chosen):
                wanted.append((t, t, None))
            wanted += [(t, m.stage1_folder(t), m.name) for m in chosen if m.stage1 == "own"]
        for teacher, name, method in wanted:
            cfg = self._distill_config(teacher, method)
            out = self.layout.stage1(name)
            done = (out / "metrics.json").exists() and same_identity(DistillConfig, read_json(out / "config.json"), cfg.to_dict()) \
                and read_json(out / "metrics.json").get("teacher_fingerprint") == self._teacher_fp(teacher)
            self._step(f"distill:{name}", done, lambda cfg=cfg, name=name, teacher=teacher: self._run_distill(cfg, name, teacher))

    def _teacher_fp(self, teacher: str) -> str | None:
        return _fingerprint(self.layout.teacher(teacher) / "metrics.json")

    def _run_distill(self, cfg, name, teacher) -> None:
        result = distill(self.run, cfg, name=name, progress=self.progress)
        metrics = {**result.metrics, "teacher_fingerprint": self._teacher_fp(teacher)}
        if distributed.current().is_main:
            write_json(result.out_dir / "metrics.json", metrics)

    def _finetune_jobs(self) -> list[tuple[str, str, str | None]]:
        """(teacher, method, stage-1 folder or None) for every stage-2 run."""
        return [(t, v, methods.get(v).stage1_folder(t)) for t in self.config.llm_teachers
                for v in self.config.methods if methods.get(v).stage2]

    def finetune(self) -> None:
        for teacher, method, stage1 in self._finetune_jobs():
            name = f"{teacher}-{method}"
            settings = {**self._llm_settings(), "templates": self.config.templates, **self.config.finetune, "teacher": teacher,
                        "method": method, "options": self.config.method_options.get(method, {})}
            # `w USP` gets an untrained soft prompt of the same size as the distilled one
            settings.setdefault("soft_tokens", self.config.distill.get("soft_tokens", DistillConfig.soft_tokens))
            if stage1:
                settings["soft_prompt"] = str(self.layout.soft_prompt(stage1))
            if methods.get(method).stage2_from_stage1_llm:
                settings["llm"] = str(self.layout.stage1_llm(stage1))
            cfg = FinetuneConfig(**settings)
            upstream = _fingerprint(self.layout.stage1(stage1) / "metrics.json") if stage1 else self._teacher_fp(teacher)
            out = self.layout.stage2(name)
            done = (out / "metrics.json").exists() and same_identity(FinetuneConfig, read_json(out / "config.json"), cfg.to_dict()) \
                and read_json(out / "metrics.json").get("upstream_fingerprint") == upstream
            self._step(f"finetune:{name}", done, lambda cfg=cfg, name=name, upstream=upstream: self._run_finetune(cfg, name, upstream))

    def _run_finetune(self, cfg, name, upstream) -> None:
        result = finetune(self.run, cfg, name=name, progress=self.progress)
        if distributed.current().is_main:
            write_json(result.out_dir / "metrics.json", {**result.metrics, "upstream_fingerprint": upstream})

    def evaluate(self) -> None:
        data = RunData.load(self.layout.data)
        rows = subset_rows(data, "test", self.config.test_samples, self.config.eval_seed)
        for name, source in self.config.models():
            path, settings = self.layout.pipeline_eval(name), self._eval_settings(name, source, rows)
            self._step(f"eval:{name}", _recorded(path, settings), lambda name=name, settings=settings, path=path:
                       self._run_eval(data, rows, name, settings, path))
        if self.config.retrieval:
            self._evaluate_full_catalogue(data, rows)
        if self.config.candidate_orders:
            self._evaluate_orders(data, rows)

    def _eval_settings(self, name: str, source: str | None, rows: np.ndarray) -> dict:
        """What identifies a model's test result (not the scoring batch size, which does not change scores)."""
        # the bare LLM's results (zero-shot, LLMSEQSIM) depend on the backbone and on nothing upstream
        bare_llm = name == "zero-shot" or (source is None and ModelName.parse(name).method in methods.METHODS)
        settings = {"rows": rows.tolist(), "source": _fingerprint(Path(source)) if source else None,
                    "llm": self.config.llm if bare_llm else None}
        if name == "zero-shot" and self.config.templates:  # (stage folders record their own wording)
            settings["templates"] = self.config.templates
        if self.config.eval_weights != "float":  # (results of float weights keep their earlier identity)
            settings["weights"] = self.config.eval_weights
        return settings

    def _scorer(self, data, name: str):
        c = self.config
        return make_scorer(self.run, data, name, llm=c.llm, dtype=c.dtype, device=c.device, batch_size=c.eval_batch_size,
                           progress=self.progress, template_overrides=c.templates, weights=c.eval_weights)

    def _run_eval(self, data, rows, name, settings, path) -> None:
        scorer = self._scorer(data, name)
        t0 = time.perf_counter()
        ranks, top1 = candidate_outcomes(scorer, data, rows)
        result = {"model": name, "scorer": scorer.name, "split": "test", "num_samples": int(len(rows)),
                  "candidates": metrics_from_ranks(ranks), "seconds": round(time.perf_counter() - t0, 1),
                  "ranks": np.asarray(ranks).astype(int).tolist(), "top1": np.asarray(top1).astype(int).tolist(),
                  "settings": settings}
        if distributed.current().is_main:
            write_json(path, result)

    def _evaluate_full_catalogue(self, data, rows) -> None:
        """Every model over the whole catalogue: the LLM models in two stages behind the retriever
        (delrec.evaluation.two_stage), the references and teachers by their own full ranking."""
        retriever, k = self.config.retrieval
        for name, source in self.config.models():
            path = self.layout.pipeline_eval(name, "full-catalogue")
            settings = {**self._eval_settings(name, source, rows), "retrieve": k, "retriever": retriever,
                        "retriever_source": self._teacher_fp(retriever)}
            self._step(f"eval-full:{name}", _recorded(path, settings), lambda name=name, settings=settings, path=path:
                       self._run_full_catalogue(data, rows, name, settings, path))

    def _run_full_catalogue(self, data, rows, name, settings, path) -> None:
        scorer, (retriever, k) = self._scorer(data, name), self.config.retrieval
        t0 = time.perf_counter()
        if self.config.is_llm_model(name):
            ranker = scorer.ranker if isinstance(scorer, RetrieveThenRank) else scorer
            ranks, k = two_stage_ranks(ranker, self._scorer(data, retriever), data, rows, k)
        else:
            ranks = full_ranks(scorer, data, rows)
        ranks = np.asarray(ranks).astype(int)
        result = {"model": name, "split": "test", "num_samples": int(len(rows)), "two_stage": self.config.is_llm_model(name),
                  "retriever": retriever, "retrieve": int(k), "within_retrieve": float(np.mean(ranks < k)),
                  "full_ranking": metrics_from_ranks(ranks), "seconds": round(time.perf_counter() - t0, 1),
                  "ranks": ranks.tolist(), "settings": settings}
        if distributed.current().is_main:
            write_json(path, result)

    def _evaluate_orders(self, data, rows) -> None:
        """Every LLM model again with its candidates in each of `candidate_orders` (delrec.evaluation.orders)."""
        for name, source in self.config.models():
            if not self.config.is_llm_model(name):
                continue
            path = self.layout.pipeline_eval(name, "orders")
            settings = {**self._eval_settings(name, source, rows), "candidate_orders": list(self.config.candidate_orders)}
            self._step(f"eval-orders:{name}", _recorded(path, settings), lambda name=name, settings=settings, path=path:
                       self._run_orders(data, rows, name, settings, path))

    def _run_orders(self, data, rows, name, settings, path) -> None:
        scorer, stored = self._scorer(data, name), read_json(self.layout.pipeline_eval(name))
        t0 = time.perf_counter()
        # the stored order's outcomes are the model's own evaluation's (scored again if it predates top-1s)
        base = (np.asarray(stored["ranks"]), np.asarray(stored["top1"])) if "top1" in stored else candidate_outcomes(scorer, data, rows)
        others = {seed: order_outcomes(scorer, data, rows, seed) for seed in self.config.candidate_orders}
        result = {"model": name, "split": "test", "num_samples": int(len(rows)), **order_summary(base, others),
                  "orders": {str(s): {"ranks": r.astype(int).tolist(), "top1": t.astype(int).tolist()} for s, (r, t) in others.items()},
                  "seconds": round(time.perf_counter() - t0, 1), "settings": settings}
        if distributed.current().is_main:
            write_json(path, result)

    def write_report(self) -> None:
        # the report reads pipeline.json, which therefore holds every step before it
        self._step("report", False, lambda: write_report(self.run, self.config), main_only=True)

    def _write_summary(self, final: bool = True) -> None:
        """pipeline.json: every step's last real run (time, memory) plus this invocation's wall time.
        Written after each step that ran too (`final=False`), so that an invocation killed later
        keeps its steps' times for the next one; such an interim record also keeps the earlier
        invocations' steps this one has not reached yet."""

        # a skipped step keeps its last real run's time and memory; `this_invocation` says what happened now
        steps = [{**(self.earlier[e["step"]] if e["status"] == "skipped" and e["step"] in self.earlier else e),
                  "this_invocation": e["status"]} for e in self.steps]
        if not final:
            walked = {e["step"] for e in steps}
            steps += [{**e, "this_invocation": "not reached yet"} for name, e in self.earlier.items() if name not in walked]
        total = sum(e["seconds"] or 0.0 for e in steps)
        if not distributed.current().is_main:
            return
        write_json(self.layout.pipeline_summary, {"steps": steps, "total_seconds": round(total, 1),
                                                "this_invocation_seconds": round(time.perf_counter() - self.started, 1), "threads": torch.get_num_threads()})

    # -- driver ------------------------------------------------------------------------------

    def execute(self) -> list[dict]:
        """Every step in order, holding the run folder's lock (delrec.core.locks): one writer per run."""

        self.run.mkdir(parents=True, exist_ok=True)
        with run_lock(self.run):
            return self._execute()

    def _execute(self) -> list[dict]:
        c = self.config
        if c.threads:
            torch.set_num_threads(c.threads)
        self.run.mkdir(parents=True, exist_ok=True)
        main = distributed.current().is_main
        handler = logging.FileHandler(self.run / "pipeline.log") if main else logging.NullHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger("delrec")
        root.addHandler(handler)
        if root.level == logging.NOTSET or root.level > logging.INFO:
            root.setLevel(logging.INFO)
        try:

            if main:
                with atomic_path(self.layout.config) as tmp:
                    tmp.write_text(yaml.safe_dump(asdict(c), sort_keys=False))
            log.info("pipeline %s, torch threads %d", self.run, torch.get_num_threads())
            self.started = time.perf_counter()
            with tracking.for_run(c.tracking, self.run, asdict(c)):
                self.data()
                self.teachers()
                self.distill()
                self.finetune()
                self.evaluate()
                if c.report:
                    self._write_summary()
                    self.write_report()
                self._write_summary()
            return self.steps
        finally:
            root.removeHandler(handler)
            handler.close()
