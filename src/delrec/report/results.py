"""The report's results: the test metrics of every model, the paper's claim checked with paired
tests, the ablations, cold-start users and case studies."""

from __future__ import annotations

import numpy as np

from delrec.evaluation.significance import compare, per_sample
from delrec.report.context import ReportContext
from delrec.report.inputs import run_scorer
from delrec.report.paper_numbers import (
    METRICS,
    PAPER_TABLE2_ML100K,
    PAPER_TABLE2_NOT_RUN,
    TABLE2_LLM_BASELINES,
    TABLE2_TEACHER_ROWS,
)

SIGNIFICANT = 0.05


COLD_START = 3  # the paper's Section V-F: users with fewer than 3 earlier interactions


HEADER = ["| model | " + " | ".join(METRICS) + " | paper HR@1 | paper NDCG@5 |", "|---|" + "---|" * (len(METRICS) + 2)]


def results_section(ctx: ReportContext) -> list[str]:
    """Table II: every reference, teacher, DELRec and LLM-based baseline on the test samples, the
    paper's HR@1 and NDCG@5 beside them (ablations are in their own section)."""
    L = ["## Results (Table II style)", "", *HEADER]
    for name, res in ctx.evals.items():
        L += _result_rows(ctx, name, res["candidates"])
    if ctx.paper:
        L += ["", "Paper: DELRec and the LLM-based baselines with Flan-T5-XL, and the zero-shot row of Flan-T5-XL "
              "(Table II); the paper's own data pipeline and candidate sampling, shown for orientation, not as a "
              "like-for-like comparison. Our baselines run on this run's backbone, candidates and stage 2 "
              "(docs/baselines.md)."]
    L.append("")
    return L


def _result_rows(ctx: ReportContext, name: str, metrics: dict) -> list[str]:
    method, paper = ctx.method(name), ctx.paper
    if method is None:  # references, teachers, the zero-shot LLM
        return [_row(ctx.label(name), metrics, paper.get(name))]
    if not method.is_delrec and not method.paper_rows:  # an ablation only
        return []
    theirs = [PAPER_TABLE2_ML100K[r] for r in method.paper_rows if r in PAPER_TABLE2_ML100K] if paper else []
    L = [_row(ctx.table2_name(name), metrics,
              paper.get(name) if method.is_delrec else theirs[0] if len(theirs) == 1 else None)]
    if len(theirs) > 1:  # one of ours stands for several of the paper's rows: each of theirs below it
        L += [f"| {r} (paper) |" + " |" * len(METRICS) + f" {v[0]:.4f} | {v[3]:.4f} |" for r, v in zip(method.paper_rows, theirs)]
    return L


def claim_section(ctx: ReportContext) -> list[str]:
    """The paper's claim, per teacher: DELRec against each Table II baseline this run evaluated on
    the same samples (paired tests), whether the claim holds here, and which rows were not run."""
    L = []
    for t in ctx.teachers:
        name = f"{t}-delrec"
        others = [b for b in baselines(ctx) if b != name]
        if name in ctx.evals and others:
            L += _claim_lines(ctx, t, others)
    return L


def baselines(ctx: ReportContext) -> list[str]:
    """The models DELRec is compared with in the paper's Table II that this run evaluated: the
    teachers, the zero-shot LLM and every method standing for a Table II row."""
    out = [t for t in ctx.teachers if t in ctx.evals] + [n for n in ("zero-shot",) if n in ctx.evals]
    out += [n for n in ctx.evals if (m := ctx.method(n)) is not None and m.paper_rows]
    return out


def _claim_lines(ctx: ReportContext, t: str, others: list[str]) -> list[str]:
    L = [f"## The paper's claim: {ctx.label(f'{t}-delrec')} above every baseline of Table II?", "",
         "Paired tests on the same test samples (HR@1: exact McNemar; NDCG@5: sign-flip permutation); "
         f"significant: p < {SIGNIFICANT}.", "", *claim_table(ctx, t, others, ctx.evals)]
    missing = [r for r in TABLE2_LLM_BASELINES
               if not any(r in (m.paper_rows if (m := ctx.method(b)) else ()) for b in others)]
    missing += [row for teacher, row in TABLE2_TEACHER_ROWS.items() if teacher not in others]
    missing += list(PAPER_TABLE2_NOT_RUN)
    if not missing:
        return L + ["", "Every Table II baseline has a model in this comparison (docs/baselines.md says how each differs from the original).", ""]
    return L + ["", f"Not in this comparison (not run here, or no method of delrec stands for them yet): {', '.join(missing)}.", ""]


def claim_table(ctx: ReportContext, t: str, others: list[str], evals: dict) -> list[str]:
    """The paired tests of DELRec(t) against each of `others` on the ranks in `evals` (the
    15-candidate evaluations or the full-catalogue ones), and the sentence that sums them up."""
    name = f"{t}-delrec"
    L = ["| baseline | HR@1 DELRec − baseline | p | NDCG@5 DELRec − baseline | p | verdict |", "|---|---|---|---|---|---|"]
    groups = {"above": [], "partly": [], "below": [], "unclear": []}
    for b in others:
        v = compare(evals[name]["ranks"], evals[b]["ranks"])
        h, n = v["HR@1"], v["NDCG@5"]
        verdict, group, on = claim_verdict(v)
        groups[group].append(ctx.table2_name(b) + (f" (on {on[0]} only)" if group == "below" and len(on) == 1 else ""))
        L.append(f"| {ctx.table2_name(b)} | {h['diff']:+.4f} | {h['p_value']:.3g} | {n['diff']:+.4f} | {n['p_value']:.3g} | {verdict} |")
    return L + ["", _claim_sentence(ctx.label(name), groups)]


def _claim_sentence(delrec: str, groups: dict[str, list[str]]) -> str:
    above, partly, below, unclear = groups["above"], groups["partly"], groups["below"], groups["unclear"]
    if not below and not unclear and not partly:
        return f"**The claim holds here**: {delrec} is significantly above every baseline this run evaluated, on HR@1 and NDCG@5."
    parts = [f"below {', '.join(below)}" if below else "", f"not significantly different from {', '.join(unclear)}" if unclear else "",
             f"above on one metric only against {', '.join(partly)}" if partly else "",
             f"above {', '.join(above)} on both metrics" if above else ""]
    return f"**The claim does not hold here**: {delrec} is " + "; ".join(p for p in parts if p) + "."


def claim_verdict(comparison: dict) -> tuple[str, str, tuple[str, ...]]:
    """DELRec against one baseline from `compare`'s paired tests on HR@1 and NDCG@5: the verdict
    written in the report, its group (`above`: significantly above on both metrics; `below`:
    significantly below on at least one; `partly`: above on one metric, the other not
    significant; `unclear`: neither significant) and the metrics on which the group's difference
    is significant."""
    metrics = ("HR@1", "NDCG@5")
    better = tuple(m for m in metrics if comparison[m]["diff"] > 0 and comparison[m]["p_value"] < SIGNIFICANT)
    worse = tuple(m for m in metrics if comparison[m]["diff"] < 0 and comparison[m]["p_value"] < SIGNIFICANT)
    if worse:
        return ("DELRec **below**" if len(worse) == 2 else f"DELRec **below** on {worse[0]} only"), "below", worse
    if len(better) == 2:
        return "DELRec above", "above", better
    if better:
        return f"DELRec above on {better[0]} only", "partly", better
    return "no significant difference", "unclear", ()


def ablations_section(ctx: ReportContext) -> list[str]:
    """Tables III-IV: each ablation of DELRec on the same samples, and its paired difference from
    DELRec with the same teacher (what each component is worth here)."""
    abl = [n for n in ctx.evals if not ctx.model(n).bare and ((m := ctx.method(n)) is None or m.ablation)]
    if not abl:
        return []
    L = ["## Ablations (Tables III-IV)", "", *HEADER]
    L += [_row(ctx.label(name), ctx.evals[name]["candidates"], ctx.paper.get(name)) for name in abl]
    for t in ctx.teachers:
        base = ctx.evals.get(f"{t}-delrec")
        for name in abl:
            if base is not None and ctx.model(name).teacher == t and name != f"{t}-delrec":
                v = compare(base["ranks"], ctx.evals[name]["ranks"])
                L.append(f"- {ctx.label(f'{t}-delrec')} vs {ctx.label(name)}: HR@1 {v['HR@1']['diff']:+.4f} (p {v['HR@1']['p_value']:.3g}), "
                         f"NDCG@5 {v['NDCG@5']['diff']:+.4f} (p {v['NDCG@5']['p_value']:.3g})")
    L.append("")
    return L


def cold_start_section(ctx: ReportContext) -> list[str]:
    """Section V-F's slice: every model on the test users with little history, where a
    sequential teacher has least to go on."""
    if not ctx.evals:
        return []
    cold = ctx.data.history_len[ctx.rows] < COLD_START
    L = [f"## Cold start: users with fewer than {COLD_START} earlier interactions", ""]
    if cold.sum() == 0:
        return L + [f"None of the {len(ctx.rows)} test samples is cold-start (the chronological split puts few new users "
                    "in the test period).", ""]
    L += [f"{int(cold.sum())} of the {len(ctx.rows)} test samples.", "", "| model | HR@1 | NDCG@5 |", "|---|---|---|"]
    for name, res in ctx.evals.items():
        r = np.asarray(res["ranks"])[cold]
        L.append(f"| {ctx.label(name)} | {per_sample(r, 'HR@1').mean():.4f} | {per_sample(r, 'NDCG@5').mean():.4f} |")
    L.append("")
    return L


def case_studies_section(ctx: ReportContext) -> list[str]:
    """Figure 9: three test samples of the first teacher and its DELRec (the first in subset order
    of each kind: both right, only DELRec right, only the teacher right), scored again."""
    cases = _case_studies(ctx, ctx.teachers[0]) if ctx.evals else []
    if not cases:
        return []
    return ["## Case studies (Figure 9 style)", "", "The first test sample (in subset order) of each kind; not chosen by hand.", "", *cases]


def _case_picks(evals: dict, teacher: str, name: str) -> list[tuple[str, int]]:
    """(kind, index into the test subset) of the first sample of each kind that has one."""
    hit_t = np.asarray(evals[teacher]["ranks"]) == 0
    hit_d = np.asarray(evals[name]["ranks"]) == 0
    picks = []
    for kind, mask in (("both right", hit_t & hit_d), ("only DELRec right", hit_d & ~hit_t),
                       ("only the teacher right", hit_t & ~hit_d)):
        idx = np.flatnonzero(mask)
        if len(idx):
            picks.append((kind, int(idx[0])))
    return picks


def _case_studies(ctx: ReportContext, teacher: str) -> list[str]:
    """The picked samples with history, each model's top-1 and the truth."""
    name, data = f"{teacher}-delrec", ctx.data
    if teacher not in ctx.evals or name not in ctx.evals:
        return []
    picks = _case_picks(ctx.evals, teacher, name)
    if not picks:
        return []
    chosen = np.array([ctx.rows[i] for _, i in picks])
    titles = [""] + data.items["title"].tolist()
    top1 = {}
    for model in (teacher, name):
        scores = np.asarray(run_scorer(ctx.config, data, model).score_candidates(data, chosen), dtype=np.float64)
        top1[model] = data.candidates[chosen, scores.argmax(axis=1)]
    out = []
    for j, (kind, _) in enumerate(picks):
        r = chosen[j]
        history = [titles[k] for k in data.history[r] if k > 0]
        out += [f"**Case {j + 1} ({kind}), test sample {int(data.sample_id[r])}.**", "",
                f"- history (most recent last): {'; '.join(history)}",
                f"- {ctx.label(teacher)} top-1: {titles[top1[teacher][j]]}",
                f"- {ctx.label(name)} top-1: {titles[top1[name][j]]}",
                f"- truth: {titles[data.target[r]]}", ""]
    return out


def _row(label: str, metrics: dict, paper=None, extra: str = "") -> str:
    ours = " | ".join(f"{metrics[k]:.4f}" for k in METRICS)
    theirs = f" | {paper[0]:.4f} | {paper[3]:.4f}" if paper else " | | "
    return f"| {label}{extra} | {ours}{theirs} |"


def paired_table(other: str, comparisons: list[tuple[str, dict]]) -> list[str]:
    """Rows of `significance.compare` results (DELRec first, `other` second) as a Markdown table."""
    out = [f"| metric | DELRec | {other} | difference (95% CI) | relative | p-value (test) |", "|---|---|---|---|---|---|"]
    for m, v in comparisons:
        rel = f"{v['relative']:+.1%}" if v["relative"] is not None else ""
        out.append(f"| {m} | {v['a']:.4f} | {v['b']:.4f} | {v['diff']:+.4f} ({v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}) "
                   f"| {rel} | {v['p_value']:.3g} ({v['test']}) |")
    return out
