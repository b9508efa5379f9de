"""What each `delrec` subcommand does with its parsed arguments (delrec.cli.parser builds them)."""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from delrec.core.layout import RunLayout
from delrec.serving.limits import ServiceLimits

log = logging.getLogger(__name__)


def _settings(args: argparse.Namespace, names: tuple[str, ...], config_cls) -> dict:
    """Settings of `config_cls` from `--set key=value` (the value is YAML, as in `delrec run`
    overrides: `--set lr=5e-4`, `--set tasks=[rps]`) and from the named options that were given;
    every key and type checked before any work starts."""
    from delrec.core.settings import check, parse_overrides

    out = parse_overrides(args.set, "--set")
    out.update({n: getattr(args, n) for n in names if getattr(args, n) is not None})
    return check(config_cls, out, "--set")


def cmd_data_fetch(args: argparse.Namespace) -> None:
    from delrec.data.acquisition.fetch import fetch_dataset, verify_dataset

    path = fetch_dataset(args.dataset, cache_dir=args.cache_dir, force=args.force, from_paths=args.from_paths,
                         base_url=args.base_url, timeout=args.timeout, progress=not args.quiet)
    if args.verify:
        for name, sha in verify_dataset(args.dataset, cache_dir=args.cache_dir).items():
            log.info("%s: sha256 %s, as recorded", name, sha)
    print(path)


def cmd_data_prepare(args: argparse.Namespace) -> None:
    from delrec.data.loaders import load_dataset
    from delrec.data.protocol import NotEnoughData, ProtocolConfig, prepare, without_title
    from delrec.data.store import write_run_data

    t0 = time.perf_counter()
    config = ProtocolConfig.for_protocol(
        args.protocol, seed=args.seed, max_history=args.max_history, min_count=args.min_count,
        num_candidates=args.num_candidates,
    )
    raw = load_dataset(args.dataset, cache_dir=args.cache_dir, progress=not args.quiet)
    try:
        prepared = prepare(raw.interactions, raw.items, config, read=raw.source.get("read"))
    except NotEnoughData as err:
        raise NotEnoughData(f"{args.dataset}: {err}") from None
    deleted = write_run_data(args.out, prepared, args.dataset, raw.source, delete_stale=args.force)
    if deleted:
        log.info("deleted the results made from the earlier data: %s", ", ".join(deleted))
    s = prepared.stats
    f = s["filtered"]
    print(
        f"{args.dataset} ({config.name}): {f['users']} users, {f['items']} items, {f['interactions']} interactions, "
        f"sparsity {f['sparsity']:.2%}; samples train/valid/test "
        f"{s['samples']['train']}/{s['samples']['valid']}/{s['samples']['test']} "
        f"-> {RunLayout(args.out).data} ({time.perf_counter() - t0:.1f} s)"
    )
    read, untitled = raw.source.get("read"), without_title(raw.source.get("read"))
    if read:  # what the publisher's files held before the title filter (docs/datasets.md compares it with the paper)
        print(f"  as read: {read['users_read']} users, {read['items_read']} items, {read['interactions_read']} interactions; "
              f"{read['items_without_title']} items without a title dropped with their "
              f"{read['interactions_of_items_without_title']} interactions"
              + (f" ({untitled['items_share']:.1%} of the items, {untitled['interactions_share']:.1%} of the "
                 "interactions)" if untitled else "")
              + f"; exact duplicates dropped: {s['raw']['duplicates_dropped']} (protocol.json: source.read; stats.json)")


def cmd_teacher_train(args: argparse.Namespace) -> None:
    from delrec.teachers import default_config
    from delrec.teachers.base import TeacherConfig
    from delrec.training.teacher import train_teacher

    overrides = _settings(args, ("patience", "max_seconds", "seed"), TeacherConfig)
    if args.epochs is not None:
        overrides["max_epochs"] = args.epochs
    config = default_config(args.model, **overrides)
    result = train_teacher(args.run, config, device=args.device, top_h=args.top_h, progress=not args.quiet, restart=args.restart)
    m = result.metrics
    from delrec.evaluation.metrics import format_table

    print(f"{args.model}: best epoch {m['best_epoch']} of {m['epochs_run']}, {m['train_seconds']:.0f} s on {m['device']}")
    print(format_table([m["test"]]))
    if "full_ranking" in m["test"]:  # (not for a target-aware model: teachers/kda.py)
        print(f"full ranking:\n{format_table([m['test']], 'full_ranking')}")
    print(f"-> {result.out_dir}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from delrec.core import distributed
    from delrec.core.io import write_json
    from delrec.data.store import RunData
    from delrec.evaluation.metrics import evaluate, format_table, subset_rows
    from delrec.serving.scorers import make_scorer

    is_main = distributed.current().is_main
    run = Path(args.run)
    data = RunData.load(RunLayout(run).data)
    models = args.models
    if not models:
        trained = sorted(p.parent.name for p in RunLayout(run).teachers.glob("*/model.safetensors"))
        models = [] if (args.llm or args.finetuned) else ["random", "popularity", *trained]
    rows = subset_rows(data, args.split, args.limit, args.limit_seed)
    results = []
    if args.finetuned:
        models = [*models, f"llm:{Path(args.finetuned).name}"]
    elif args.llm:
        models = [*models, f"llm:{args.llm}"]
    for name in models:
        # random, popularity and teachers by name; any model of the run folder through the same factory
        scorer = _llm_scorer(args, data) if name.startswith("llm:") else make_scorer(run, data, name, device=args.device,
                                                                                     llm=args.llm, dtype=args.dtype)
        full = (args.full_ranking or data.config.name == "loo") and not name.startswith("llm:")
        res = evaluate(scorer, data, args.split, full_ranking=full, rows=rows)
        if args.limit:
            res["subset"] = {"limit": args.limit, "seed": args.limit_seed, "of": int(len(data.indices(args.split)))}
        tag = name.replace(":", "-").replace("/", "_") + (f".limit{args.limit}" if args.limit else "")
        if is_main:  # under a multi-process launch every process scores its shard; one writes
            write_json(RunLayout(run).cli_eval(tag, args.split), res)
        results.append(res)
    subset = f", a seeded subset of {len(rows)} samples (--limit)" if args.limit else ""
    print(f"{data.config.name} protocol, {args.split} split{subset}, {data.config.num_candidates} candidates (ties pessimistic)")
    print(format_table(results))
    if any("full_ranking" in r for r in results):
        print("\nfull ranking (items seen before the target excluded)")
        print(format_table(results, "full_ranking"))
    if not args.limit and not args.llm and not args.finetuned and is_main:
        write_json(RunLayout(run).cli_eval("summary", args.split), results)


def _templates(args, teacher: str | None = None):
    """--templates FILE and --teacher-name over the teacher's own wording (Templates.for_teacher)."""
    from delrec.llm.templates import Templates, read_overrides

    overrides = read_overrides(args.templates) if args.templates else {}
    if args.teacher_name:
        overrides["teacher"] = args.teacher_name
    return Templates.for_teacher(teacher, **overrides) if teacher else Templates(**overrides)


def _llm_scorer(args, data):
    """`--finetuned FOLDER` (a stage-2 result: its backbone, adapter, soft prompt and prompt
    method, as trained) or `--llm NAME [--soft-prompt FILE]` (the frozen LLM), through the one
    scorer factory (delrec.serving.scorers)."""
    from delrec.core.io import read_json
    from delrec.serving.scorers import make_scorer

    kw = {"dtype": args.dtype, "device": args.device, "batch_size": args.batch_size, "title_scoring": args.verbalizer,
          "weights": getattr(args, "weights", "float")}
    if getattr(args, "finetuned", None):
        folder = Path(args.finetuned)
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"{folder} is not a stage-2 folder (no config.json); run `delrec finetune` first")
        teacher = read_json(folder / "config.json")["teacher"]
        templates = _templates(args, teacher) if (args.templates or args.teacher_name) else None
        return make_scorer(Path(args.run), data, str(folder), templates=templates, **kw)
    return make_scorer(Path(args.run), data, "zero-shot", llm=args.llm, templates=_templates(args), soft_prompt=args.soft_prompt,
                       label=f"llm:{args.llm}" + (" +soft prompt" if args.soft_prompt else ""), **kw)


def cmd_finetune(args: argparse.Namespace) -> None:
    from delrec.training.config import FinetuneConfig
    from delrec.training.finetune import finetune

    overrides = _settings(args, ("teacher", "llm", "method", "soft_prompt", "steps", "batch_size", "objective", "max_seconds", "seed", "dtype", "device"),
                          FinetuneConfig)
    if args.templates:
        from delrec.llm.templates import read_overrides

        overrides["templates"] = read_overrides(args.templates)
    result = finetune(args.run, FinetuneConfig(**overrides), name=args.name, progress=not args.quiet, restart=args.restart)
    m = result.metrics
    print(f"stage 2 ({m['method']}): {m['steps']} steps in {m['seconds']:.0f} s, best valid NDCG@5 "
          f"{m['best_valid_NDCG@5']:.4f} at step {m['best_step']} ({m['valid_samples']} valid samples)")
    print(f"-> {result.out_dir}; evaluate with: delrec evaluate --run {args.run} --finetuned {result.out_dir}")


def cmd_run(args: argparse.Namespace) -> None:
    from delrec.config import PipelineConfig
    from delrec.pipeline import Pipeline
    from delrec.report.writer import format_steps

    overrides = list(args.overrides)
    if args.seeds:
        overrides.append(f"seeds=[{args.seeds}]")
    config = PipelineConfig.from_file(args.config, overrides)
    if args.quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    if config.seeds or config.sweep:  # several runs: delrec.experiments
        from delrec.experiments import Experiment

        experiment = Experiment(config, progress=not args.quiet)
        result = experiment.execute()
        print(f"{len(result['runs'])} runs ({result['steps_skipped']} steps reused or done earlier) in {result['seconds']:.0f} s")
        print(f"-> {experiment.run}" + (f"; report: {RunLayout(experiment.run).report}" if config.report else ""))
        return
    pipeline = Pipeline(config, progress=not args.quiet)
    steps = pipeline.execute()
    print(format_steps(steps))
    print(f"-> {pipeline.run}" + (f"; report: {pipeline.layout.report}" if config.report else ""))


def cmd_report(args: argparse.Namespace) -> None:
    from delrec.report.writer import write_report

    run = Path(args.run)
    if (run / "experiment.json").exists():  # seeds or a sweep: the aggregate report
        from delrec.core.io import read_json
        from delrec.experiments import write_experiment_report

        print(f"-> {write_experiment_report(run, read_json(run / 'experiment.json'))}")
        return
    print(f"-> {write_report(run)}")


def cmd_export(args: argparse.Namespace) -> None:
    """One trained model of a run as a folder to share (delrec.serving.bundle)."""
    from delrec.serving.bundle import export_model

    out = export_model(args.run, args.model, args.out)
    print(f"-> {out}: load it with Recommender.from_pretrained({str(out)!r}), or upload the folder to the Hugging Face Hub")


def cmd_recommend(args: argparse.Namespace) -> None:
    """Rank candidates for one history with the LLM, through the Python API (delrec.serving.recommender):
    the same checks (unknown titles with the closest ones, duplicates, candidates already in the
    history, the history cut to the model's window) for the command and for the API."""
    from delrec.data.store import RunData
    from delrec.serving.recommender import Recommender

    run = Path(args.run)
    data = RunData.load(RunLayout(run).data)
    if args.num_candidates is not None and args.num_candidates < 2:
        raise ValueError(f"--num-candidates: at least 2 candidates to rank, got {args.num_candidates}")
    scorer = _llm_scorer(args, data)
    rec = Recommender(run, data, scorer, scorer.name, args.teacher, args.device, args.num_candidates)
    n = len(args.candidates) if args.candidates else rec.num_candidates
    result = rec.rank(args.history, args.candidates or None, k=n)
    if result.history_truncated:
        print(f"history: the {result.history_truncated} earliest titles left out (the model reads the last {rec.max_history})")
    print(f"history: {', '.join(result.history_used)}")
    print(f"candidates: {result.candidates_from}; ranked by {scorer.name} ({args.verbalizer})")
    for rank, item in enumerate(result.items, 1):
        print(f"{rank:3d}. {item.score:8.4f}  {item.title}")


def cmd_serve(args: argparse.Namespace) -> None:
    """Serve a model of a run folder over HTTP (delrec.serving.app) until Ctrl-C or SIGTERM."""
    from delrec.serving.recommender import Recommender

    if args.num_candidates is not None and args.num_candidates < 2:
        raise ValueError(f"--num-candidates: at least 2 candidates to rank, got {args.num_candidates}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: must be at least 1, got {args.batch_size}")
    limits = _service_limits(args)
    token = os.environ.get("DELREC_SERVE_TOKEN") or None
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
        if not token:
            raise ValueError(f"--token-file {args.token_file}: the file is empty")
    hosts = [h.strip() for h in (args.allowed_hosts or "").split(",") if h.strip()]
    allowed = None if hosts == ["*"] else (set(hosts) if hosts else "default")
    from delrec.serving.server import serve

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads: must be at least 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    rec = Recommender.from_run(args.run, model=args.model, teacher=args.teacher, device=args.device, dtype=args.dtype, llm=args.llm,
                               batch_size=args.batch_size, num_candidates=args.num_candidates, max_candidates=args.max_candidates)
    serve(rec, args.host, args.port, limits, log_level="info" if args.verbose else "warning", allowed_hosts=allowed, token=token)


# `delrec serve`'s options for the service's limits (delrec.serving.limits.ServiceLimits): option -> field
SERVICE_LIMIT_OPTIONS = {"max_batch": "max_batch", "batch_wait_ms": "max_wait_ms", "max_queue": "max_queue",
                         "max_body_bytes": "max_body_bytes", "timeout_s": "timeout_s", "header_timeout_s": "header_timeout_s",
                         "body_timeout_s": "body_timeout_s", "max_connections": "max_connections"}


def _service_limits(args: argparse.Namespace):
    """The limits given on the command line, the service's defaults for the rest; a wrong one is
    named by its option."""
    given = {field: getattr(args, dest) for dest, field in SERVICE_LIMIT_OPTIONS.items() if getattr(args, dest) is not None}
    try:
        return ServiceLimits(**given)
    except ValueError as err:
        field, _, problem = str(err).partition(" ")
        option = next(dest for dest, f in SERVICE_LIMIT_OPTIONS.items() if f == field).replace("_", "-")
        raise ValueError(f"--{option}: {problem}") from None


def cmd_distill(args: argparse.Namespace) -> None:
    from delrec.training.config import DistillConfig
    from delrec.training.distill import distill

    overrides = _settings(args, ("teacher", "llm", "steps", "soft_tokens", "top_h", "batch_size", "objective", "max_seconds", "seed", "dtype", "device"),
                          DistillConfig)
    if args.without:
        overrides["tasks"] = tuple(t for t in ("ta", "rps") if t not in args.without)
    if args.templates:
        from delrec.llm.templates import read_overrides

        overrides["templates"] = read_overrides(args.templates)
    config = DistillConfig(**overrides)
    result = distill(args.run, config, name=args.name, progress=not args.quiet, restart=args.restart)
    m = result.metrics
    print(f"stage 1: {m['steps']} steps in {m['seconds']:.0f} s; valid accuracy untrained -> trained soft prompt:")
    for key, before in m["untrained"].items():
        print(f"  {key}: {before:.3f} -> {m['trained'][key]:.3f}")
    print(f"-> {result.out_dir / 'soft_prompt.safetensors'}")
