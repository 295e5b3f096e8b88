"""The driver: which stages are current, stale or missing, and running them.

Each finished stage writes `result/<run>/manifests/<stage>.json` (last, atomically):
    {"stage", "fingerprint", "run_id", "upstream": {name: {"fingerprint", "run_id"}},
     "outputs": {...}, "metrics": {...}, "wall_time_s", "finished_at"}
A stage's fingerprint hashes its own config section, the data section, the seed
and its upstream stages' fingerprints. A stage is
    done        its manifest matches the current fingerprint and upstream run ids,
                and (per-image stages) every expected output exists;
    incomplete  as done, but some per-image outputs are missing (a rerun fills them);
    stale       the config or an upstream stage changed since it ran;
    not run     no manifest.
"""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from pipeline import artifacts
from pipeline.config import Config, dump_config, fingerprint
from pipeline.errors import PipelineError
from pipeline.stage import STAGE_NAMES, STAGES, StageContext, StageSpec, get_stage

log = logging.getLogger("wsss")


def manifest_path(cfg: Config, name: str) -> Path:
    return cfg.result_dir / "manifests" / f"{name}.json"


def started_path(cfg: Config, name: str) -> Path:
    return cfg.result_dir / "manifests" / f"{name}.started.json"


def read_manifest(cfg: Config, name: str) -> dict | None:
    path = manifest_path(cfg, name)
    if not path.exists():
        return None
    return artifacts.load_json(path)


def stage_fingerprint(cfg: Config, name: str, _memo: dict | None = None) -> str:
    memo = {} if _memo is None else _memo
    if name not in memo:
        spec = get_stage(name)
        memo[name] = fingerprint({
            "stage": name,
            "section": getattr(cfg, name),
            "data": cfg.data,
            "seed": cfg.seed,
            "upstream": {u: stage_fingerprint(cfg, u, memo) for u in spec.reads},
        })
    return memo[name]


def make_context(cfg: Config, spec: StageSpec, runtime, resume: bool = True) -> StageContext:
    return StageContext(
        name=spec.name, section=getattr(cfg, spec.name), data=cfg.data, seed=cfg.seed,
        result_dir=cfg.result_dir, sess_dir=cfg.sess_dir, runtime=runtime,
        fingerprint=stage_fingerprint(cfg, spec.name), resume=resume, work_dir=Path(cfg.work_dir),
    )


@dataclass
class StageStatus:
    name: str
    state: str                 # done | incomplete | stale | not run | not implemented | disabled
    reason: str = ""
    manifest: dict | None = None

    @property
    def done(self) -> bool:
        return self.state == "done"


def _missing_outputs(cfg: Config, spec: StageSpec, runtime) -> int:
    module = spec.load()
    if not hasattr(module, "expected_outputs"):
        return 0
    ctx = make_context(cfg, spec, runtime)
    return sum(1 for p in module.expected_outputs(ctx) if not Path(p).exists())


def stage_status(cfg: Config, name: str, runtime=None, check_outputs: bool = True) -> StageStatus:
    spec = get_stage(name)
    manifest = read_manifest(cfg, name)
    if manifest is None:
        if not spec.implemented:
            return StageStatus(name, "not implemented")
        if not getattr(cfg, name).enabled:
            return StageStatus(name, "disabled")
        return StageStatus(name, "not run")
    if manifest.get("fingerprint") != stage_fingerprint(cfg, name):
        return StageStatus(name, "stale", "its config (or an upstream stage's config) changed since it ran", manifest)
    for upstream in spec.reads:
        up = read_manifest(cfg, upstream)
        recorded = manifest.get("upstream", {}).get(upstream, {})
        if up is None:
            return StageStatus(name, "stale", f"upstream stage '{upstream}' has no manifest any more", manifest)
        if up.get("run_id") != recorded.get("run_id"):
            return StageStatus(name, "stale", f"upstream stage '{upstream}' was re-run since", manifest)
    if check_outputs and spec.per_image:
        missing = _missing_outputs(cfg, spec, runtime)
        if missing:
            return StageStatus(name, "incomplete", f"{missing} output file(s) missing", manifest)
    return StageStatus(name, "done", "", manifest)


def select_stages(cfg: Config, only=(), skip=(), from_stage=None, to_stage=None) -> list[StageSpec]:
    for n in [*only, *skip, *(x for x in (from_stage, to_stage) if x)]:
        get_stage(n)  # unknown name -> error
    if only:
        chosen = [s for s in STAGES if s.name in only]
    else:
        lo = STAGE_NAMES.index(from_stage) if from_stage else 0
        hi = STAGE_NAMES.index(to_stage) if to_stage else len(STAGES) - 1
        if lo > hi:
            raise PipelineError(f"--from {from_stage} comes after --to {to_stage}")
        chosen = [s for s in STAGES[lo:hi + 1] if getattr(cfg, s.name).enabled]
    chosen = [s for s in chosen if s.name not in skip]
    if not chosen:
        raise PipelineError("no stage selected (check --only / --skip / --from / --to and the stages' `enabled` keys)")
    return chosen


def check_plan(cfg: Config, plan: list[StageSpec], runtime) -> None:
    """Fail before anything runs: unimplemented stages, upstream neither planned nor done."""
    planned = {s.name for s in plan}
    for spec in plan:
        if not spec.implemented:
            raise PipelineError(f"stage '{spec.name}' is not implemented yet in this version of the toolkit")
        for upstream in spec.reads:
            if upstream in planned:
                continue
            status = stage_status(cfg, upstream, runtime)
            if not status.done:
                up = get_stage(upstream)
                why = f" ({status.reason})" if status.reason else ""
                raise PipelineError(
                    f"stage '{spec.name}' needs {up.writes}, made by stage '{upstream}', which is {status.state}{why}. "
                    f"Run it first: python run_pipeline.py run --config <file> --only {upstream}"
                )


def run_stage(cfg: Config, spec: StageSpec, runtime) -> dict:
    """Run one stage and write its manifest (last). Returns the manifest."""
    fp = stage_fingerprint(cfg, spec.name)
    started = started_path(cfg, spec.name)
    # Per-image outputs and training checkpoints are reused only when they were made
    # under the same fingerprint: after a config change everything is recomputed.
    resume = started.exists() and artifacts.load_json(started).get("fingerprint") == fp
    runtime.barrier()
    if runtime.is_main:
        manifest_path(cfg, spec.name).unlink(missing_ok=True)
        artifacts.save_json(started, {"fingerprint": fp})
    runtime.barrier()
    module = spec.load()
    ctx = make_context(cfg, spec, runtime, resume=resume)
    log.info("== %s (%s)", spec.name, "resuming" if resume else "fresh")
    t0 = time.time()
    summary = module.run(ctx) or {}
    runtime.barrier()
    wall = time.time() - t0
    manifest = {
        "stage": spec.name,
        "fingerprint": fp,
        "run_id": uuid.uuid4().hex,
        "upstream": {
            u: {"fingerprint": (read_manifest(cfg, u) or {}).get("fingerprint"),
                "run_id": (read_manifest(cfg, u) or {}).get("run_id")}
            for u in spec.reads
        },
        "outputs": summary.get("outputs", {}),
        "metrics": summary.get("metrics", {}),
        "wall_time_s": round(wall, 2),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if runtime.is_main:
        artifacts.save_json(manifest_path(cfg, spec.name), manifest)
    runtime.barrier()
    log.info("== %s done in %.1f s", spec.name, wall)
    return manifest


def run_pipeline(cfg: Config, runtime, plan: list[StageSpec], force: bool = False, force_names=()) -> list[str]:
    """Run the planned stages in order, skipping the current ones. Returns the names run."""
    check_plan(cfg, plan, runtime)
    if runtime.is_main:
        dump_config(cfg, cfg.result_dir / "config.yaml")
    ran = []
    for spec in plan:
        status = stage_status(cfg, spec.name, runtime)
        if status.done and not force and spec.name not in force_names:
            log.info("== %s is current, skipped", spec.name)
            continue
        if status.state in ("stale", "incomplete"):
            log.info("== %s is %s: %s", spec.name, status.state, status.reason)
        try:
            run_stage(cfg, spec, runtime)
        except PipelineError:
            raise
        except KeyboardInterrupt:
            raise PipelineError(
                f"interrupted during stage '{spec.name}'. Finished outputs are kept; resume with the same command."
            ) from None
        ran.append(spec.name)
    return ran
