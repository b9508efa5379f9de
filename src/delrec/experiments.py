"""Seeds and sweeps: one `delrec run` config that runs the experiment several times.

* `seeds: [0, 1, 2]` runs the whole experiment once per seed (its teachers, both stages, every
  method, each with that seed) into RUN/seed-N/. The data split and candidates stay the same for
  every seed (prepared once in RUN/data) unless `seed_data: true`, which also re-draws them.
* `sweep: {distill.soft_tokens: [10, 20, 40], distill.top_h: [3, 5, 10]}` runs one experiment per
  point into RUN/sweep/<point>/ (and RUN/sweep/<point>/seed-N/ with seeds). `sweep_mode: axes`
  (the default, the paper's Figure 8) varies one setting at a time, the others at the config's
  value; `grid` runs every combination.

Every step that does not depend on a swept setting is done once and shared: the data, each seed's
teachers (for `distill.top_h` their stored top-h lists are as long as the largest h swept), and
the evaluations of the models upstream of the swept stage (random, popularity, the teachers,
zero-shot), which each point's pipeline checks before it skips them. Each point is an ordinary
run folder, so an interrupted experiment resumes where it stopped.

RUN/experiment.json  every point and seed: its folder, metrics, the aggregates and the tests
RUN/report.md        mean ± std over seeds, the t-test over seeds, each seed's paired
                     per-sample tests, the sweep's table and Figure 8 panels (RUN/figures/)
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from delrec.config import SECTIONS, PipelineConfig
from delrec.core.io import atomic_path, read_json, write_json
from delrec.core.layout import RunLayout
from delrec.core.locks import run_lock
from delrec.evaluation.significance import compare
from delrec.pipeline import Pipeline

log = logging.getLogger("delrec.experiments")

# settings that say how an experiment repeats itself, and so are not settings of one run
EXPERIMENT_KEYS = ("seeds", "seed_data", "sweep", "sweep_mode")
SEED_KEYS = ("teacher.seed", "distill.seed", "finetune.seed")  # what one seed sets (protocol.seed too with seed_data)
# a swept key under one of these changes the data or the teachers, which are then not shared
DATA_KEYS = ("dataset", "protocol")
TEACHER_KEYS = ("teachers", "teacher", "top_h")
NOT_SWEPT = ("run_dir", "report", "attempts", "tracking", "threads", "device", "eval_batch_size", *EXPERIMENT_KEYS, *SEED_KEYS,
             "protocol.seed")


@dataclass
class Point:
    """One run of the experiment: the swept settings' values (empty without a sweep), the seed
    (None without seeds) and its run folder."""

    values: dict
    seed: int | None
    folder: Path
    label: str = ""

    @property
    def key(self) -> str:
        return point_slug(self.values) or "base"


def point_slug(values: dict) -> str:
    """The folder name of a sweep point: `distill.soft_tokens=40,distill.top_h=5`."""
    return ",".join(f"{k}={_plain_value(v)}" for k, v in values.items())


def _plain_value(v) -> str:
    return json.dumps(v) if not isinstance(v, str) else v


def effective_value(config: PipelineConfig, key: str):
    """What `key` (`top_h`, `distill.soft_tokens`) is in `config`: its own value, or the default
    of the stage's settings class when the config leaves it out."""
    section, _, name = key.partition(".")
    if not name:
        return getattr(config, section)
    given = getattr(config, section)
    if name in given:
        return given[name]
    cls = SECTIONS.get(section)
    for f in dataclasses.fields(cls) if cls else ():
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            return f.default_factory() if f.default_factory is not dataclasses.MISSING else None
    return None


def check_experiment(config: PipelineConfig) -> None:
    """Refuse a sweep or seed list that cannot run, before anything does."""
    if config.seeds is not None:
        if not config.seeds:
            raise ValueError("seeds: an empty list (leave it out for one run)")
        if len(set(config.seeds)) != len(config.seeds):
            raise ValueError(f"seeds: {config.seeds} repeats a seed")
    if config.sweep_mode not in ("axes", "grid"):
        raise ValueError(f"sweep_mode: {config.sweep_mode!r} is not axes or grid")
    for key, values in config.sweep.items():
        if key in NOT_SWEPT or key.split(".")[0] in EXPERIMENT_KEYS:
            raise ValueError(f"sweep: {key} cannot be swept (it says how the experiment runs, or it is a seed: use seeds)")
        if not isinstance(values, list) or not values:
            raise ValueError(f"sweep: {key} needs a non-empty list of values, got {values!r}")
        if len({json.dumps(v) for v in values}) != len(values):
            raise ValueError(f"sweep: {key} repeats a value: {values}")


def _child_values(config: PipelineConfig, overrides: dict, folder: Path) -> dict:
    """The plain settings of one point's run: the experiment's, without its experiment keys,
    with the point's (and its seed's) settings set."""
    values = copy.deepcopy(asdict(config))
    for k in (*EXPERIMENT_KEYS, "attempts"):
        values.pop(k, None)
    values["run_dir"] = str(folder)
    values["report"] = False  # the experiment writes one report; `delrec report FOLDER` writes a point's
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if name:
            values.setdefault(section, {})[name] = value
        else:
            values[section] = value
    return values


class Experiment:
    """The points of a config with `seeds` and/or `sweep`, run one after another."""

    def __init__(self, config: PipelineConfig, progress: bool = True):
        check_experiment(config)
        self.config, self.progress = config, progress
        self.run = Path(config.run_dir)
        self.layout = RunLayout(self.run)
        self.swept = list(config.sweep)
        self.share_data = not config.seed_data and not any(k.split(".")[0] in DATA_KEYS for k in self.swept)
        # teachers trained on another split must not be shared: a swept data setting stops both
        self.share_teachers = bool(self.swept) and not any(k.split(".")[0] in (*TEACHER_KEYS, *DATA_KEYS) for k in self.swept)
        self.points = self._points()
        self.configs = {p.folder: self.child_config(p) for p in self.points}  # every point checked before any runs

    # -- the points --------------------------------------------------------------------------

    def sweep_values(self) -> list[dict]:
        """The swept settings of every point, in order (one empty dict without a sweep)."""
        c = self.config
        if not c.sweep:
            return [{}]
        base = {k: effective_value(c, k) for k in self.swept}
        if c.sweep_mode == "grid":
            combos = [dict(zip(self.swept, combo)) for combo in itertools.product(*c.sweep.values())]
        else:  # one setting at a time, the others at the config's value
            combos = [{**base, key: v} for key in self.swept for v in c.sweep[key]]
        seen, out = set(), []
        for combo in combos:  # the base point of two axes is one run
            slug = point_slug(combo)
            if slug not in seen:
                seen.add(slug)
                out.append(combo)
        return out

    def _points(self) -> list[Point]:
        seeds = self.config.seeds or [None]
        out = []
        for values in self.sweep_values():
            where = self.run / "sweep" / point_slug(values) if values else self.run
            for seed in seeds:
                folder = where / f"seed-{seed}" if seed is not None else where
                out.append(Point(values, seed, folder, label=", ".join(f"{k} {_plain_value(v)}" for k, v in values.items())))
        return out

    def _overrides(self, point: Point) -> dict:
        c, overrides = self.config, dict(point.values)
        if point.seed is not None:
            overrides |= {k: point.seed for k in SEED_KEYS}
            if c.seed_data:
                overrides["protocol.seed"] = point.seed
        swept_h = [v for k, vs in c.sweep.items() if k == "distill.top_h" for v in vs]
        if swept_h and "top_h" not in c.sweep:  # every point's teachers store the longest list any point reads
            overrides["top_h"] = max(c.top_h, *swept_h)
        return overrides

    def child_config(self, point: Point) -> PipelineConfig:
        return PipelineConfig._from_values(_child_values(self.config, self._overrides(point), point.folder),
                                           f"{self.run} point {point.key} seed {point.seed}")

    def _shared(self, point: Point) -> dict[str, Path]:
        """The folders of `point` that are links to ones shared with other points."""
        links = {}
        seed_part = f"seed-{point.seed}" if point.seed is not None else "all"
        if self.share_data and (self.swept or self.config.seeds):
            links["data"] = self.layout.data
        elif self.swept and not any(k.split(".")[0] in DATA_KEYS for k in self.swept):  # seed_data: one per seed
            links["data"] = self.layout.shared(seed_part).data
        if self.share_teachers:
            links["teachers"] = self.layout.shared(seed_part).teachers
        return {name: target for name, target in links.items() if point.folder / name != target}

    def _link(self, point: Point) -> None:
        point.folder.mkdir(parents=True, exist_ok=True)
        for name, target in self._shared(point).items():
            target.mkdir(parents=True, exist_ok=True)
            link = point.folder / name
            if link.is_symlink() and link.resolve() == target.resolve():
                continue
            if link.exists() or link.is_symlink():
                raise FileExistsError(f"{link} exists and is not the link to {target} this experiment shares; "
                                      "use another run_dir")
            link.symlink_to(os.path.relpath(target.resolve(), link.parent.resolve()))  # relative: RUN can move

    def _reuse_evaluations(self, point: Point, done: list[Point], config: PipelineConfig) -> int:
        """Copy the evaluations of the models upstream of every swept stage (random, popularity,
        the teachers, zero-shot) from a finished point of the same seed. The point's pipeline
        still compares their recorded settings (test rows, the teacher's fingerprint, the LLM) and
        reruns any that differ."""
        donor = next((p for p in done if p.seed == point.seed and p.folder != point.folder), None)
        if donor is None:
            return 0
        copied = 0
        for name, source in config.models():
            if source is not None and Path(source).parent.parent.name != RunLayout.TEACHERS:
                continue  # a stage-1 or stage-2 model: it depends on the swept settings
            for kind in (None, *RunLayout.EVAL_KINDS):  # (and its full-catalogue and other-order evaluations)
                src, dst = RunLayout(donor.folder).pipeline_eval(name, kind), RunLayout(point.folder).pipeline_eval(name, kind)
                if src.exists() and not dst.exists():
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    with atomic_path(dst) as tmp:
                        shutil.copyfile(src, tmp)
                    copied += kind is None
        return copied

    # -- running -----------------------------------------------------------------------------

    def execute(self) -> dict:
        """Every point in order (each resumes where it stopped), then the aggregate and report,
        holding RUN's lock (each point's pipeline holds its own folder's)."""

        self.run.mkdir(parents=True, exist_ok=True)
        with run_lock(self.run):
            return self._execute()

    def _execute(self) -> dict:
        import yaml


        with atomic_path(self.layout.config) as tmp:
            tmp.write_text(yaml.safe_dump(asdict(self.config), sort_keys=False))
        t0, done, runs = time.perf_counter(), [], []
        for n, point in enumerate(self.points, 1):
            config = self.configs[point.folder]
            self._link(point)
            reused = self._reuse_evaluations(point, done, config)
            log.info("experiment %s: point %d/%d (%s, seed %s) in %s", self.run, n, len(self.points), point.key, point.seed,
                     point.folder)
            if self.progress:
                print(f"== point {n}/{len(self.points)}: {point.label or 'the config'}"
                      + (f", seed {point.seed}" if point.seed is not None else "") + f" -> {point.folder}", flush=True)
            steps = Pipeline(config, progress=self.progress).execute()
            runs.append({"point": point.key, "values": point.values, "seed": point.seed, "folder": str(point.folder),
                         "evaluations_copied": reused, "steps": steps})
            done.append(point)
        result = aggregate(self, runs, seconds=time.perf_counter() - t0)
        write_json(self.run / "experiment.json", result)
        if self.config.report:
            write_experiment_report(self.run, result)
        return result


# -- aggregation ---------------------------------------------------------------------------------


def _point_metrics(folder: Path) -> dict[str, dict]:
    """model -> {"metrics": {...}, "ranks": [...]} from a finished point's evaluations."""
    out = {}
    for path in sorted(RunLayout(folder).pipeline_evals.glob("*.json")):
        e = read_json(path)
        out[e["model"]] = {"metrics": e["candidates"], "ranks": e["ranks"], "num_samples": e["num_samples"]}
    return out


def mean_std(values: list[float]) -> dict:
    """Mean, sample standard deviation (n-1; None for one value) and count."""
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else None, "n": int(a.size),
            "values": [float(v) for v in a]}


def seed_t_test(a: list[float], b: list[float]) -> dict:
    """The paired t-test over seeds of model a against model b (scipy.stats.ttest_rel, two-sided).
    Paired, not Welch: in each seed both models are trained with that seed on the same split and
    scored on the same test samples, and DELRec distils that seed's teacher, so their results
    share the seed's luck. None when fewer than 2 seeds or the differences do not vary."""
    from scipy import stats

    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    out = {"test": "paired t-test over seeds (scipy.stats.ttest_rel)", "n": int(d.size), "mean_diff": float(d.mean()),
           "t": None, "p_value": None, "df": int(d.size - 1)}
    if d.size < 2 or np.allclose(d, d[0], rtol=0.0, atol=1e-12):  # equal up to rounding: t is not defined
        return out
    result = stats.ttest_rel(a, b)
    out["t"], out["p_value"] = float(result.statistic), float(result.pvalue)
    return out


def _delrec_models(models) -> list[str]:
    return [m for m in models if m.endswith("-delrec")]


def aggregate(experiment: Experiment, runs: list[dict], seconds: float) -> dict:
    """Per point: every model's mean ± std over seeds, and each DELRec model against every
    other model: the t-test over seeds and each seed's per-sample paired tests."""

    metrics = ("HR@1", "NDCG@5")
    points = []
    for key in dict.fromkeys(r["point"] for r in runs):
        mine = [r for r in runs if r["point"] == key]
        per_seed = {r["seed"]: _point_metrics(Path(r["folder"])) for r in mine}
        models = list(next(iter(per_seed.values())))
        summary = {m: {metric: mean_std([per_seed[s][m]["metrics"][metric] for s in per_seed]) for metric in metrics}
                   for m in models if all(m in per_seed[s] for s in per_seed)}
        tests = {}
        for ours in _delrec_models(summary):
            for other in summary:
                if other == ours:
                    continue
                tests[f"{ours} vs {other}"] = {
                    metric: {"over_seeds": seed_t_test(summary[ours][metric]["values"], summary[other][metric]["values"]),
                             "per_seed": {str(s): _small(compare(np.asarray(per_seed[s][ours]["ranks"]),
                                                                 np.asarray(per_seed[s][other]["ranks"]), (metric,))[metric])
                                          for s in per_seed}}
                    for metric in metrics}
        points.append({"point": key, "values": mine[0]["values"], "seeds": [r["seed"] for r in mine],
                       "folders": [r["folder"] for r in mine], "test_samples": next(iter(per_seed.values()))[models[0]]["num_samples"],
                       "models": summary, "tests": tests})
    reused = sum(1 for r in runs for s in r["steps"] if s.get("status") == "skipped")
    c = experiment.config
    return {"run": str(experiment.run), "seeds": c.seeds, "seed_data": c.seed_data, "sweep": c.sweep, "sweep_mode": c.sweep_mode,
            "sweep_base": {k: effective_value(c, k) for k in c.sweep}, "points": points,
            "runs": [{k: v for k, v in r.items() if k != "steps"} | {"steps_ran": sum(s.get("status") == "ran" for s in r["steps"]),
                                                                       "steps_skipped": sum(s.get("status") == "skipped" for s in r["steps"])}
                     for r in runs],
            "steps_skipped": reused, "seconds": round(seconds, 1)}


def _small(c: dict) -> dict:
    return {"diff": c["diff"], "p_value": c["p_value"], "test": c["test"]}


# -- the report ----------------------------------------------------------------------------------


def _fmt(s: dict) -> str:
    return f"{s['mean']:.4f}" + (f" ± {s['std']:.4f}" if s["std"] is not None else "")


def _p(p) -> str:
    return "–" if p is None or (isinstance(p, float) and math.isnan(p)) else f"{p:.3g}"


def write_experiment_report(run: Path, result: dict) -> Path:
    """RUN/report.md of a seeds or sweep experiment, and its Figure 8 panels."""
    seeds, points = result["seeds"], result["points"]
    L = [f"# Experiment {run.name}", ""]
    what = []
    if seeds:
        what.append(f"{len(seeds)} seeds ({', '.join(map(str, seeds))}; data split and candidates "
                    f"{'re-drawn per seed' if result['seed_data'] else 'the same for every seed'})")
    if result["sweep"]:
        what.append(f"a sweep ({result['sweep_mode']}) over {', '.join(result['sweep'])}: {len(points)} points")
    skipped = result["steps_skipped"]
    L += ["; ".join(what) + f". {len(result['runs'])} runs, {result['seconds']:.0f} s in this invocation; "
          f"{skipped} step{'' if skipped == 1 else 's'} shared with another run or done earlier. "
          f"Test samples per run: {points[0]['test_samples']}.", ""]
    if result["sweep"]:
        L += _sweep_section(run, result)
    for point in points:
        L += _point_section(point, seeds)
    L += ["Each run is an ordinary run folder (`folders` in experiment.json): `delrec report FOLDER` writes its own "
          "report with the per-sample tests and figures.", ""]
    path = RunLayout(run).report
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(L))
    return path


def _point_section(point: dict, seeds) -> list[str]:
    title = point["point"] if point["values"] else "Results"
    L = [f"## {title}", ""]
    n = len(point["seeds"])
    L += [f"Mean{' ± standard deviation (n-1)' if n > 1 else ''} over {n} seed{'s' if n > 1 else ''}.", "",
          "| model | HR@1 | NDCG@5 |", "|---|---|---|"]
    for model, m in point["models"].items():
        L.append(f"| {model} | {_fmt(m['HR@1'])} | {_fmt(m['NDCG@5'])} |")
    L.append("")
    if point["tests"] and n > 1:
        L += ["The paper's test over repeated runs: a paired t-test over seeds (each seed's models share its teacher, "
              "split and test samples), two-sided. Beside it, each seed's paired per-sample p-values (McNemar exact "
              "for HR@1, sign-flip permutation for NDCG@5).", "",
              "| comparison | HR@1 diff | t | p (seeds) | p per seed | NDCG@5 diff | t | p (seeds) | p per seed |",
              "|---|---|---|---|---|---|---|---|---|"]
        for name, t in point["tests"].items():
            cells = []
            for metric in ("HR@1", "NDCG@5"):
                o = t[metric]["over_seeds"]
                per = ", ".join(_p(v["p_value"]) for v in t[metric]["per_seed"].values())
                cells += [f"{o['mean_diff']:+.4f}", "–" if o["t"] is None else f"{o['t']:.2f}", _p(o["p_value"]), per]
            L.append(f"| {name} | " + " | ".join(cells) + " |")
        L.append("")
    elif point["tests"]:
        L += ["One seed: no test over seeds. Paired per-sample p-values:", ""]
        for name, t in point["tests"].items():
            L.append(f"- {name}: HR@1 {t['HR@1']['over_seeds']['mean_diff']:+.4f} "
                     f"(p {_p(next(iter(t['HR@1']['per_seed'].values()))['p_value'])}), NDCG@5 "
                     f"{t['NDCG@5']['over_seeds']['mean_diff']:+.4f} (p {_p(next(iter(t['NDCG@5']['per_seed'].values()))['p_value'])})")
        L.append("")
    return L


def _sweep_section(run: Path, result: dict) -> list[str]:
    points, swept = result["points"], list(result["sweep"])
    delrec = [m for m in _delrec_models(points[0]["models"])]
    L = ["## The sweep", "", "| " + " | ".join(swept) + " | " + " | ".join(f"{m} HR@1 | {m} NDCG@5" for m in delrec) + " |",
         "|" + "---|" * (len(swept) + 2 * len(delrec))]
    for point in points:
        cells = [_plain_value(point["values"][k]) for k in swept]
        for m in delrec:
            s = point["models"].get(m)
            cells += [_fmt(s["HR@1"]), _fmt(s["NDCG@5"])] if s else ["–", "–"]
        L.append("| " + " | ".join(cells) + " |")
    L.append("")
    for figure in draw_sweep(run, result):
        L += [f"![{figure.stem}](figures/{figure.name})", ""]
    return L


def draw_sweep(run: Path, result: dict) -> list[Path]:
    """The paper's Figure 8: HR@1 of each DELRec model against each swept setting (the others at
    the config's value in axes mode; one line per combination of the others in grid mode), with
    the standard deviation over seeds as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points, swept = result["points"], list(result["sweep"])
    out = []
    for key in swept:
        others = [k for k in swept if k != key]
        fig, ax = plt.subplots(figsize=(4.2, 3.2))
        for model in _delrec_models(points[0]["models"]):
            groups: dict[str, list] = {}
            for point in points:
                rest = {k: point["values"][k] for k in others}
                if result["sweep_mode"] == "axes" and any(point["values"][k] != result["sweep_base"][k] for k in others):
                    continue  # on another axis
                groups.setdefault(point_slug(rest), []).append(point)
            for rest, group in groups.items():
                group = sorted(group, key=lambda p: p["values"][key])
                xs = [p["values"][key] for p in group]
                ys = [p["models"][model]["HR@1"]["mean"] for p in group]
                err = [p["models"][model]["HR@1"]["std"] or 0.0 for p in group]
                label = model + (f" ({rest})" if rest and result["sweep_mode"] == "grid" else "")
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
        ax.set_xlabel(key)
        ax.set_ylabel("HR@1 (test)")
        ax.set_title(f"HR@1 against {key.split('.')[-1]}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = RunLayout(run).figures / f"fig8-{key.replace('.', '-')}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
        plt.close(fig)
        out.append(path)
    return out
