"""``batchmates study FILE --out DIR``: a resumable study of named variants x shared seeds, claim by claim.

A study file is a variants file (:mod:`batchmates.training.variants`: ``settings``, ``seeds``, ``variants``) plus
``claims`` (and optional ``title``, ``severities`` and ``plots``)::

    title: Fashion-MNIST
    seeds: 5
    settings: {data: fashion-mnist, epochs: 4}
    variants:
      supervised/ce: {method: ce}
      supervised/supcon: {method: supcon}
    claims:
      supcon:
        claim: SupCon is at least as accurate as cross-entropy
        source: Khosla et al. 2020 (arXiv:2004.11362)
        metrics: [accuracy]            # one comparison per metric
        margin: 0.005                  # optional (fraction; see study_stats)
        compare: ["supervised/supcon >= supervised/ce"]
    plots:
      label_noise: {CE: [supervised/ce, noise/ce@0.4]}   # accuracy against each run's label noise
      corruption: [shift/vit-self, shift/vit-miba]       # accuracy against corruption severity

``extends: BASE.yaml`` takes the variants, claims and plots of another study file (relative path) and lays this
file's keys over it (``settings`` merged key by key); ``variant_settings`` (``{"ssl/*": {epochs: 10}}``, glob
patterns over variant names) changes the named variants' own settings: a larger budget of the same study is a
few lines.

A comparison is ``"VARIANT > BASELINE"`` (better) or ``"VARIANT >= BASELINE"`` (at least as good), or a mapping
``{variant, baseline, relation, metric, margin}``. Metrics: ``accuracy`` (the method's classifier, or the linear
probe), ``linear``, ``knn20``, ``knn200``, ``corruptions`` (mean over kinds and severities) and ``corruption@S``
(mean over kinds at severity S). A variant evaluated on corruptions sets ``corruptions: true``.

Running: every run lives in ``DIR/<variant>/seed<k>`` (compare's layout and its run planning, checks and
skip/resume: :func:`batchmates.training.compare.plan_runs`); runs go seed by seed, so a study stopped early
still covers every variant; ``jobs`` runs train side by side in worker processes, and Ctrl-C or SIGTERM stops
all of them (:mod:`.workers`; a stopped run resumes from its last checkpoint). After every finished run the
report is regenerated (``DIR/results.json``, ``DIR/results.md``, plots: :mod:`.study_report`), so partial
results can be committed while the study goes on. Rerunning the study on a finished directory trains nothing
and rewrites the same report; ``report_only`` never trains (it reports what is there).

Paper: none (library infrastructure); the claims come from the papers cited in the study file.

Library choices: verdict rules in :mod:`batchmates.training.study_stats`; the report holds no wall-clock time
of the study command itself, so that regenerating it gives identical files.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from batchmates.config import ConfigError, RunConfig
from batchmates.training.compare import RunPlan, check_builds, plan_runs, resolve_variants, run_plan
from batchmates.training.rundir import read_metrics
from batchmates.training.study_report import _CORR, METRICS, metric_value, write_report
from batchmates.training.study_stats import RELATIONS
from batchmates.training.variants import Variant, load_variants_file, read_yaml_mapping

__all__ = ["Study", "Claim", "Comparison", "load_study", "run_study", "select_variants", "metric_value", "plan_study",
           "METRICS"]

_CMP = re.compile(r"^\s*(\S+)\s*(>=|>)\s*(\S+)\s*$")


def _check_metric(metric: str, where: str) -> str:
    if metric in METRICS or _CORR.fullmatch(metric):
        return metric
    raise ConfigError(f"{where}: unknown metric {metric!r}; choose from {list(METRICS)} or corruption@1..5")


@dataclass(frozen=True)
class Comparison:
    """``variant RELATION baseline`` on ``metric`` (paired by seed); ``margin`` None: the relation's default."""

    variant: str
    baseline: str
    metric: str
    relation: str
    margin: float | None = None


@dataclass(frozen=True)
class Claim:
    id: str
    claim: str
    source: str = ""
    note: str = ""
    comparisons: tuple[Comparison, ...] = ()


@dataclass
class Study:
    """A parsed study file."""

    path: str
    title: str
    variants: list[Variant]
    settings: dict[str, Any]
    seeds: list[int]
    claims: list[Claim]
    severities: list[int] | None = None
    plots: dict[str, Any] = field(default_factory=dict)


def _seed_list(seeds: Any) -> list[int]:
    out = list(range(seeds)) if isinstance(seeds, int) and not isinstance(seeds, bool) else list(seeds or [])
    if not out or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in out):
        raise ConfigError(f"seeds must be a count >= 1 or a list of integers >= 0, got {seeds!r} (--seeds)")
    return out


def _comparisons(cid: str, raw: dict[str, Any], names: set[str], where: str) -> tuple[Comparison, ...]:
    metrics = raw.get("metrics", raw.get("metric", "accuracy"))
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    margin = raw.get("margin")
    items = raw.get("compare")
    if not items:
        raise ConfigError(f"{where}: claim {cid!r} needs 'compare': a list like ['a/variant > a/baseline']")
    out = []
    for item in items:
        if isinstance(item, str):
            m = _CMP.match(item)
            if not m:
                raise ConfigError(f"{where}: claim {cid!r}: {item!r} must read 'VARIANT > BASELINE' or "
                                  "'VARIANT >= BASELINE'")
            spec = {"variant": m.group(1), "relation": m.group(2), "baseline": m.group(3)}
        elif isinstance(item, dict):
            spec = dict(item)
        else:
            raise ConfigError(f"{where}: claim {cid!r}: a comparison is a string or a mapping, got {item!r}")
        rel = spec.get("relation", ">")
        if rel not in RELATIONS:
            raise ConfigError(f"{where}: claim {cid!r}: relation {rel!r} must be one of {list(RELATIONS)}")
        for key in ("variant", "baseline"):
            if spec.get(key) not in names:
                raise ConfigError(f"{where}: claim {cid!r}: {key} {spec.get(key)!r} is not a variant of the study; "
                                  f"variants: {sorted(names)}")
        mets = spec.get("metrics", spec.get("metric", metrics))
        for met in [mets] if isinstance(mets, str) else mets:
            out.append(Comparison(spec["variant"], spec["baseline"], _check_metric(met, where), rel,
                                  None if spec.get("margin", margin) is None else float(spec.get("margin", margin))))
    return tuple(out)


def _read_study_data(path: str, depth: int = 0) -> dict[str, Any]:
    """The study file's mapping, with ``extends: BASE`` resolved (the base's keys, this file's on top; ``settings``
    merged key by key); ``extends`` is relative to this file."""
    data = read_yaml_mapping(path, "study file")
    if not isinstance(data, dict) or "extends" not in data:
        return data
    if depth > 4:
        raise ConfigError(f"study file {path!r}: 'extends' nests more than 4 files deep")
    base = _read_study_data(os.path.join(os.path.dirname(path), str(data.pop("extends"))), depth + 1)
    settings = {**(base.get("settings") or {}), **(data.get("settings") or {})}
    return {**base, **data, "settings": settings}


def _patch_variants(variants: list[Variant], patches: Any, path: str) -> list[Variant]:
    """Apply ``variant_settings`` (``{glob over names: {setting: value, options: {...}}}``, in file order)."""
    import fnmatch

    from batchmates.training.variants import setting_value

    if not isinstance(patches, dict):
        raise ConfigError(f"study file {path!r}: variant_settings must map a name pattern to settings, e.g. "
                          "{'ssl/*': {epochs: 10}}")
    out = []
    for v in variants:
        settings, options = dict(v.settings), dict(v.options)
        for pattern, patch in patches.items():
            if fnmatch.fnmatchcase(v.name, str(pattern)):
                patch = dict(patch or {})
                options.update(patch.pop("options", None) or {})
                settings.update(setting_value(k, x, f"study file {path!r}: variant_settings {pattern!r}")
                                for k, x in patch.items())
        out.append(Variant(v.name, v.method, settings, options, v.corruptions))
    matched = {p for p in patches if any(fnmatch.fnmatchcase(v.name, str(p)) for v in variants)}
    if set(patches) - matched:
        raise ConfigError(f"study file {path!r}: variant_settings pattern(s) {sorted(set(patches) - matched)} match "
                          "no variant")
    return out


def load_study(path: str) -> Study:
    """Parse and check a study file (see the module docstring); raises :class:`ConfigError` naming the problem."""
    data = _read_study_data(path)
    variants, settings, seeds = load_variants_file(path, data=data, flag="study file",
                                                   extra_keys=("claims", "title", "severities", "plots",
                                                               "variant_settings"))
    if data.get("variant_settings"):
        variants = _patch_variants(variants, data["variant_settings"], path)
    names = {v.name for v in variants}
    raw_claims = data.get("claims") or {}
    if not isinstance(raw_claims, dict) or not raw_claims:
        raise ConfigError(f"study file {path!r} needs 'claims': a mapping of claim id -> {{claim, compare, ...}}")
    claims = []
    for cid, raw in raw_claims.items():
        if not isinstance(raw, dict) or not raw.get("claim"):
            raise ConfigError(f"study file {path!r}: claim {cid!r} needs 'claim' (what the paper claims) and "
                              "'compare'")
        claims.append(Claim(str(cid), str(raw["claim"]), str(raw.get("source", "")), str(raw.get("note", "")),
                            _comparisons(str(cid), raw, names, f"study file {path!r}")))
    sev = data.get("severities")
    if sev is not None and (not isinstance(sev, list) or any(s not in range(1, 6) for s in sev)):
        raise ConfigError(f"study file {path!r}: severities must be a list of 1..5, got {sev!r}")
    plots = data.get("plots") or {}
    for key in plots:
        if key not in ("label_noise", "corruption"):
            raise ConfigError(f"study file {path!r}: unknown plot {key!r}; use label_noise, corruption")
    return Study(path, str(data.get("title", os.path.basename(path))), variants, settings,
                 _seed_list(seeds if seeds is not None else 5), claims, sev, dict(plots))


def plan_study(study: Study, out: str, *, seeds: Sequence[int] | None = None,
               overrides: dict[str, Any] | None = None) -> list[RunPlan]:
    """Every run of the study, resolved and checked (compare's :func:`plan_runs`); settings: file < overrides."""
    given = {**study.settings, **(overrides or {})}
    data = given.pop("data", "digits")
    variants = resolve_variants(study.variants, data)
    common = RunConfig(**given).replace(data=data)
    return plan_runs(variants, common, _seed_list(list(seeds) if seeds is not None else study.seeds), out)


def _finished(plan: RunPlan) -> bool:
    m = read_metrics(plan.cfg.out)
    return bool(m and m.get("finished")) and (not plan.corruptions or "corruptions" in (m.get("eval") or {}))


def _run_one(plan: RunPlan, severities: list[int] | None, verbose: bool) -> tuple[str, str]:
    """Worker entry (also in-process): train / resume / evaluate one run; ``(status, action)``."""
    status, _, action = run_plan(plan, severities, verbose)
    return status, action


def select_variants(study: Study, only: Sequence[str]) -> set[str]:
    """The variants that ``only`` names: claim ids (every variant the claim compares) or globs over variant names.

    Every entry must match something, so a typo fails before any training.
    """
    import fnmatch

    claims = {c.id: c for c in study.claims}
    names = [v.name for v in study.variants]
    chosen: set[str] = set()
    for pattern in only:
        if pattern in claims:
            chosen |= {n for cmp in claims[pattern].comparisons for n in (cmp.variant, cmp.baseline)}
            continue
        hits = fnmatch.filter(names, pattern)
        if not hits:
            raise ConfigError(f"--only {pattern!r} names no claim and matches no variant of {study.path!r}; "
                              f"claims: {sorted(claims)}; variants: {sorted(names)}")
        chosen |= set(hits)
    return chosen


def run_study(path: str, out: str, *, seeds: Sequence[int] | None = None, jobs: int = 1,
              overrides: dict[str, Any] | None = None, report_only: bool = False, dry_run: bool = False,
              only: Sequence[str] | None = None, verbose: bool = True,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or resume) the study in ``path`` into ``out`` and write its report; return ``results.json``'s content.

    ``seeds`` overrides the file's seeds; ``overrides`` are run settings over the file's (``threads``, ...);
    ``jobs`` runs train side by side in separate processes. Runs already finished are skipped; interrupted ones
    resume from their checkpoint. ``only`` (claim ids or variant globs, :func:`select_variants`) trains just those
    variants, to bring some claims to their full seeds first; the report still covers every finished run.
    ``report_only``: train nothing, report the finished runs. ``dry_run``: resolve and check every run, build
    every pending variant once, log the plan, and write nothing (returns the plan).
    """
    log = log or (lambda s: print(s, flush=True))
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"jobs must be an integer >= 1, got {jobs!r} (--jobs)")
    study = load_study(path)
    chosen = select_variants(study, only) if only else None
    plans = [p if p.corruptions or not _wants_corruptions(study, p) else _with_corruptions(p)
             for p in plan_study(study, out, seeds=seeds, overrides=overrides)]
    if dry_run:
        return _dry_run([p for p in plans if chosen is None or p.variant.name in chosen], log)
    os.makedirs(out, exist_ok=True)
    unfinished = [] if report_only else [p for p in plans if not _finished(p)]
    pending = [p for p in unfinished if chosen is None or p.variant.name in chosen]
    if pending:
        check_builds(pending)
        picked = f" of the variants --only names ({len(chosen)})" if chosen is not None else ""
        log(f"[study] {len(plans) - len(unfinished)} of {len(plans)} runs finished; {len(pending)} to run{picked} "
            f"({jobs} at a time)")
    failed: dict[str, str] = {}

    def done(plan: RunPlan, status: str, action: str) -> None:
        if status != "done":
            failed[plan.cfg.out] = action
        log(f"[study] {plan.variant.name} seed {plan.seed}: {action}")
        write_report(study, plans, out, failed)

    if jobs == 1 or len(pending) <= 1:
        for p in pending:
            done(p, *_run_one(p, study.severities, verbose))
    elif pending:
        from batchmates.training.threads import share_cores  # each worker's runs use the free cores / jobs
        from batchmates.training.workers import run_in_workers

        def finished(i: int, result: Any, error: Exception | None) -> None:
            # a crashed worker must not lose the other runs
            status, action = result if error is None else ("failed", f"failed: {type(error).__name__}: {error}")
            done(pending[i], status, action)

        try:
            run_in_workers(_run_one, [(p, study.severities, False) for p in pending], jobs, finished,
                           initializer=share_cores, initargs=(jobs,))
        except KeyboardInterrupt:
            write_report(study, plans, out, failed)
            log("[study] stopped: no new run started; the runs in progress stopped at their last checkpoint. Run "
                "the same command again to resume.")
            raise
    return write_report(study, plans, out, failed)


def _dry_run(plans: list[RunPlan], log: Callable[[str], None]) -> dict[str, Any]:
    """Check and describe the plan without training or writing anything."""
    pending = [p for p in plans if not _finished(p)]
    if pending:
        check_builds(pending)
    by: dict[str, list[RunPlan]] = {}
    for p in plans:
        by.setdefault(p.variant.name, []).append(p)
    for name, ps in by.items():
        c = ps[0].cfg
        todo = sum(p in pending for p in ps)
        log(f"[study] {name}: {c.method} {c.backbone} {c.epochs} ep (max_steps {c.max_steps}) bs {c.batch_size} "
            f"{c.optimizer} lr {c.lr:g} {c.precision} {c.accelerator}"
            f"{', corruptions' if ps[0].corruptions else ''}: {todo} of {len(ps)} runs to train")
    log(f"[study] dry run: {len(plans)} runs planned, {len(pending)} to train; nothing was trained or written")
    return {"runs_planned": len(plans), "runs_pending": len(pending),
            "variants": {n: [p.cfg.out for p in ps] for n, ps in by.items()}}


def _wants_corruptions(study: Study, plan: RunPlan) -> bool:
    """Whether a claim or plot of the study reads corruption figures of this run's variant."""
    name = plan.variant.name
    for c in study.claims:
        for cmp in c.comparisons:
            if name in (cmp.variant, cmp.baseline) and (cmp.metric == "corruptions" or _CORR.fullmatch(cmp.metric)):
                return True
    return name in (study.plots.get("corruption") or [])


def _with_corruptions(plan: RunPlan) -> RunPlan:
    return RunPlan(plan.variant, plan.seed, plan.cfg, True)
