"""The report's answers to the two doubts about the 15-candidate protocol: do the verdicts hold
over the whole catalogue (two-stage, delrec.evaluation.two_stage), and how much does the order in
which candidates are listed move an LLM model (delrec.evaluation.orders)?"""

from __future__ import annotations

from delrec.evaluation.significance import compare
from delrec.report.context import ReportContext
from delrec.report.paper_numbers import METRICS
from delrec.report.results import baselines, claim_table, claim_verdict


def full_catalogue_section(ctx: ReportContext) -> list[str]:
    """Every model over the whole catalogue, the retriever's recall, and DELRec's paired tests
    there with whether each 15-candidate verdict holds."""
    if not ctx.full:
        return []
    first = next(iter(ctx.full.values()))
    retriever, k = first["retriever"], first["retrieve"]
    by = ctx.label(retriever)
    L = [f"## Over the whole catalogue: {by} retrieves {k}, the LLM models rank them", "",
         f"Each LLM model ranks the top {k} items that {by} retrieves among those the user has not interacted "
         "with, listed in a seeded shuffled order; its ties are broken by the retriever's order, and a target that was "
         "not retrieved is a miss (delrec.evaluation.two_stage). Random, popularity and the teachers rank the whole "
         "catalogue themselves (items the user had seen excluded). Same test samples as above.", ""]
    if retriever in ctx.full:
        L += [f"Retriever recall@{k} ({by}): **{ctx.full[retriever]['within_retrieve']:.4f}**: the share of test "
              "samples whose target is among the retrieved items, the ceiling of every LLM model's HR here.", ""]
    L += ["| model | " + " | ".join(METRICS) + " | ranks |", "|---|" + "---|" * (len(METRICS) + 1)]
    for name, res in ctx.full.items():
        how = f"two-stage ({by} top {k})" if res["two_stage"] else "whole catalogue"
        L.append(f"| {ctx.table2_name(name)} | " + " | ".join(f"{res['full_ranking'][m]:.4f}" for m in METRICS) + f" | {how} |")
    L.append("")
    for t in ctx.teachers:
        name = f"{t}-delrec"
        others = [b for b in baselines(ctx) if b != name and b in ctx.full]
        if name in ctx.full and others:
            L += [f"{ctx.label(name)} against each baseline over the whole catalogue (paired tests as above):", "",
                  *claim_table(ctx, t, others, ctx.full), "", _verdicts_hold(ctx, name, others), ""]
    return L


def _verdicts_hold(ctx: ReportContext, name: str, others: list[str]) -> str:
    changed = []
    for b in others:
        on_15 = claim_verdict(compare(ctx.evals[name]["ranks"], ctx.evals[b]["ranks"]))[0]
        on_all = claim_verdict(compare(ctx.full[name]["ranks"], ctx.full[b]["ranks"]))[0]
        if on_15 != on_all:
            changed.append(f"{ctx.table2_name(b)} ({on_15} on 15 candidates; {on_all} over the catalogue)")
    if not changed:
        return "**Every 15-candidate verdict holds over the whole catalogue.**"
    return "**Verdicts that change over the whole catalogue**: " + "; ".join(changed) + "."


def order_section(ctx: ReportContext) -> list[str]:
    """Each LLM model's metrics with its candidates in other orders: the spread across orders and
    the share of samples whose top-1 changes."""
    if not ctx.orders:
        return []
    seeds = list(next(iter(ctx.orders.values()))["top1_changed"])
    L = ["## Order robustness: the candidates listed in other orders", "",
         f"Each LLM model scored again with every sample's 15 candidates in other seeded orders ({', '.join(seeds)}), "
         "same samples and candidates (delrec.evaluation.orders). Spread: the largest minus the smallest value across "
         "the stored order and these. Top-1 changed: the share of samples whose best-scored candidate differs from "
         "the stored order's. A model that lists its candidates in its teacher's order is unmoved by construction.", "",
         "| model | HR@1 (stored / " + " / ".join(seeds) + ") | HR@1 spread | NDCG@5 spread | NDCG@10 spread | top-1 changed |",
         "|---|---|---|---|---|---|"]
    for name, res in ctx.orders.items():
        per = res["metrics"]
        hr1 = " / ".join(f"{per[o]['HR@1']:.4f}" for o in per)
        changed = ", ".join(f"{v:.1%}" for v in res["top1_changed"].values())
        L.append(f"| {ctx.table2_name(name)} | {hr1} | {res['spread']['HR@1']:.4f} | {res['spread']['NDCG@5']:.4f} "
                 f"| {res['spread']['NDCG@10']:.4f} | {changed} |")
    return L + [""]
