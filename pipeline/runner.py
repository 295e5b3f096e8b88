"""The driver: which stages are current, stale or missing, and running them.

Each finished stage writes `result/<run>/manifests/<stage>.json` (last, atomically):
    {"stage", "fingerprint", "parts", "run_id", "upstream": {name: {"fingerprint", "run_id"}},
     "outputs", "metrics", "wall_time_s", "finished_at"}
A stage's fingerprint hashes exactly what it depends on ("parts"): its config section, the
data keys it reads, the seed, a digest of its input files (size and mtime of the images,
label sources and masks of the splits it reads) and its upstream stages' fingerprints.
A stage is
    done        its manifest matches the current fingerprint and upstream run ids, and every
                file it declares (expected_outputs) exists;
    incomplete  as done, but some outputs are missing (a rerun fills them);
    stale       something it depends on changed since it ran (the reason says what);
    not run     no manifest;  disabled: `enabled: false`.
A stale or forced stage discards its old outputs and checkpoint before it starts; a stage
that is only incomplete resumes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

from pipeline.artifacts import load_json, save_json
from pipeline.catalogue import KINDS, Catalogue
from pipeline.config import Config, dump_config, fingerprint
from pipeline.errors import PipelineError
from pipeline.methods import Method, get_method
from pipeline.stage import EmptySection, StageContext, StageSpec

log = logging.getLogger("wsss")


def method_of(cfg: Config) -> Method:
    return get_method(cfg.method)


def section_of(cfg: Config, spec: StageSpec):
    return getattr(cfg, spec.section_name, None) or EmptySection()


def catalogue_of(cfg: Config) -> Catalogue:
    return Catalogue(cfg.result_dir, cfg.sess_dir)


def read_manifest(cfg: Config, name: str) -> dict | None:
    manifests = catalogue_of(cfg).manifest
    return manifests.read(name) if manifests.exists(name) else None


def started_path(cfg: Config, name: str) -> Path:
    return cfg.result_dir / "manifests" / f"{name}.started.json"


def stage_seed(seed: int, name: str) -> int:
    """Each stage seeds itself from the run seed and its own name, so its random numbers do not
    depend on which stages ran before it in the same process."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


def split_names(cfg: Config, spec: StageSpec) -> list[str]:
    """The split names a stage reads; a section's own `split` replaces the val split."""
    section = section_of(cfg, spec)
    names = []
    for key in spec.splits:
        value = getattr(cfg.data, key)
        if key == "val_split" and getattr(section, "split", ""):
            value = section.split
        if value:
            names.append(value)
    return names


# ----------------------------------------------------------------------------- fingerprints

class Fingerprints:
    """Fingerprints of one config's stages, memoised (input digests stat files, once each)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.method = method_of(cfg)
        self._parts: dict[str, dict] = {}
        self._digests: dict[tuple, str] = {}
        self._dataset = None

    @property
    def dataset(self):
        if self._dataset is None:
            from dataset.registry import build_dataset

            self._dataset = build_dataset(self.cfg.data, cache_dir=Path(self.cfg.work_dir) / "result" / ".cache")
        return self._dataset

    def _input_digest(self, split: str, needs: tuple[str, ...]) -> str:
        key = (split, needs)
        if key not in self._digests:
            dataset = self.dataset
            ids = dataset.ids(split)
            paths: list[Path] = []
            if "images" in needs:
                paths += [dataset.image_path(i) for i in ids]
            if "labels" in needs:
                paths += dataset.label_sources(ids)
            if "masks" in needs:
                paths += [dataset.mask_path(i) for i in ids]
            if "instances" in needs and hasattr(dataset, "instance_mask_path"):
                paths += [dataset.instance_mask_path(i) for i in ids]
            digest = hashlib.sha256("\n".join(ids).encode())
            for path in paths:
                try:
                    st = os.stat(path)
                    digest.update(f"{path}:{st.st_size}:{st.st_mtime_ns};".encode())
                except FileNotFoundError:
                    digest.update(f"{path}:absent;".encode())
            self._digests[key] = digest.hexdigest()[:16]
        return self._digests[key]

    def parts(self, name: str) -> dict:
        if name not in self._parts:
            spec = self.method.stage(name)
            data = self.cfg.data
            data_keys = {"dataset": data.dataset, "root": data.root,
                         **{k: getattr(data, k) for k in spec.splits}}
            if "images" in spec.needs:
                data_keys.update(mean=data.mean, std=data.std)
            self._parts[name] = {
                "section": fingerprint(section_of(self.cfg, spec)) if dataclasses.is_dataclass(
                    section_of(self.cfg, spec)) else "",
                "data": fingerprint(data_keys),
                "seed": self.cfg.seed,
                "inputs": {s: self._input_digest(s, spec.needs) for s in split_names(self.cfg, spec)},
                "upstream": {u: self.of(u) for u in spec.reads},
            }
        return self._parts[name]

    def of(self, name: str) -> str:
        return fingerprint(self.parts(name))


def stage_fingerprint(cfg: Config, name: str) -> str:
    return Fingerprints(cfg).of(name)


def _stale_reason(old: dict, new: dict) -> str:
    if not old:
        return "it was run by an older version of the toolkit"
    if old.get("section") != new["section"]:
        return "its config section changed"
    if old.get("data") != new["data"]:
        return "the data keys it reads changed"
    if old.get("seed") != new["seed"]:
        return "the seed changed"
    if old.get("inputs") != new["inputs"]:
        changed = [s for s in new["inputs"] if old.get("inputs", {}).get(s) != new["inputs"][s]]
        return f"its input files changed (split {', '.join(changed) or '?'}: images, labels or masks)"
    for upstream, fp in new["upstream"].items():
        if old.get("upstream", {}).get(upstream) != fp:
            return f"upstream stage '{upstream}' changed"
    return "its fingerprint changed"


# ----------------------------------------------------------------------------- status

def make_context(cfg: Config, spec: StageSpec, runtime, fingerprint_: str = "", resume: bool = True) -> StageContext:
    section = section_of(cfg, spec)
    return StageContext(
        name=spec.name, section=section, data=cfg.data, seed=cfg.seed,
        result_dir=cfg.result_dir, sess_dir=cfg.sess_dir, runtime=runtime,
        fingerprint=fingerprint_, resume=resume, work_dir=Path(cfg.work_dir),
        split_override=getattr(section, "split", "") or "", options=dict(spec.options),
    )


@dataclass
class StageStatus:
    name: str
    state: str                 # done | incomplete | stale | not run | disabled
    reason: str = ""
    manifest: dict | None = None

    @property
    def done(self) -> bool:
        return self.state == "done"


def _missing_outputs(cfg: Config, spec: StageSpec, runtime) -> list[Path]:
    module = spec.load()
    if not hasattr(module, "expected_outputs"):
        return []
    ctx = make_context(cfg, spec, runtime)
    return [p for p in module.expected_outputs(ctx) if not Path(p).exists()]


def stage_status(cfg: Config, name: str, runtime=None, prints: Fingerprints | None = None,
                 check_outputs: bool = True) -> StageStatus:
    prints = prints or Fingerprints(cfg)
    spec = prints.method.stage(name)
    manifest = read_manifest(cfg, name)
    if manifest is None:
        if not section_of(cfg, spec).enabled:
            return StageStatus(name, "disabled")
        return StageStatus(name, "not run")
    if manifest.get("fingerprint") != prints.of(name):
        return StageStatus(name, "stale", _stale_reason(manifest.get("parts") or {}, prints.parts(name)), manifest)
    for upstream in spec.reads:
        up = read_manifest(cfg, upstream)
        recorded = manifest.get("upstream", {}).get(upstream, {})
        if up is None:
            return StageStatus(name, "stale", f"upstream stage '{upstream}' has no manifest any more", manifest)
        if up.get("run_id") != recorded.get("run_id"):
            return StageStatus(name, "stale", f"upstream stage '{upstream}' was re-run since", manifest)
    if check_outputs:
        missing = _missing_outputs(cfg, spec, runtime)
        if missing:
            return StageStatus(name, "incomplete", f"{len(missing)} output file(s) missing, e.g. {missing[0]}",
                               manifest)
    return StageStatus(name, "done", "", manifest)


# ----------------------------------------------------------------------------- planning

def select_stages(cfg: Config, only=(), skip=(), from_stage=None, to_stage=None) -> list[StageSpec]:
    method = method_of(cfg)
    names = method.stage_names
    for n in [*only, *skip, *(x for x in (from_stage, to_stage) if x)]:
        method.stage(n)  # unknown name -> error
    if only:
        chosen = [s for s in method.stages if s.name in only]
    else:
        lo = names.index(from_stage) if from_stage else 0
        hi = names.index(to_stage) if to_stage else len(names) - 1
        if lo > hi:
            raise PipelineError(f"--from {from_stage} comes after --to {to_stage}")
        chosen = [s for s in method.stages[lo:hi + 1] if section_of(cfg, s).enabled]
    chosen = [s for s in chosen if s.name not in skip]
    if not chosen:
        raise PipelineError("no stage selected (check --only / --skip / --from / --to and the stages' `enabled` keys)")
    return chosen


def preflight(cfg: Config, plan: list[StageSpec], runtime, explicit=()) -> list[StageSpec]:
    """Check, before the first stage runs, what every planned stage needs: the data set, its
    splits, images, labels, masks, and the upstream stages that are not planned. An evaluation
    stage whose split has no ground truth is left out with one line, or is an error when it was
    asked for by name. Returns the plan that will run."""
    prints = Fingerprints(cfg)
    kept: list[StageSpec] = []
    for spec in plan:
        skip_reason = ""
        for split in split_names(cfg, spec):
            dataset = prints.dataset
            ids = dataset.ids(split)       # an unknown or empty split is an error here
            if "images" in spec.needs:
                dataset.check_images(split)
            dataset.validate(split, spec.needs)
            if "labels" in spec.needs:
                dataset.load_label_cache([split])
            if "masks" in spec.needs and not dataset.has_masks(split):
                skip_reason = f"split '{split}' has no ground-truth masks ({dataset.mask_path(ids[0])} ...)"
            if "instances" in spec.needs and not dataset.has_instance_masks(split):
                skip_reason = f"split '{split}' has no instance masks (SegmentationObject)"
        if skip_reason:
            if spec.name in explicit:
                raise PipelineError(f"stage '{spec.name}' has nothing to score: {skip_reason}")
            log.info("== %s left out: %s", spec.name, skip_reason)
            continue
        kept.append(spec)
    planned = {s.name for s in kept}
    method = prints.method
    for spec in kept:
        for upstream in spec.reads:
            if upstream in planned:
                continue
            status = stage_status(cfg, upstream, runtime, prints)
            if not status.done:
                why = f" ({status.reason})" if status.reason else ""
                raise PipelineError(
                    f"stage '{spec.name}' needs {method.stage(upstream).describe_outputs()}, made by stage "
                    f"'{upstream}', which is {status.state}{why}. "
                    f"Run it first: python run_pipeline.py run --config <file> --only {upstream}")
    if not kept:
        raise PipelineError("no stage left to run: every selected stage has nothing to score")
    return kept


# ----------------------------------------------------------------------------- running

def discard_outputs(cfg: Config, spec: StageSpec, runtime) -> None:
    """Remove what an earlier run of the stage left (per-image folders, its metrics, its
    checkpoint, its declared files), so that nothing stale survives a re-run."""
    artifacts = catalogue_of(cfg)
    for kind in spec.writes:
        bound = artifacts[kind]
        if KINDS[kind].per_image:
            shutil.rmtree(bound.folder, ignore_errors=True)
        elif kind in ("metrics", "checkpoint"):
            bound.path(spec.name).unlink(missing_ok=True)
    module = spec.load()
    if hasattr(module, "expected_outputs"):
        for path in module.expected_outputs(make_context(cfg, spec, runtime)):
            Path(path).unlink(missing_ok=True)


def run_stage(cfg: Config, spec: StageSpec, runtime, prints: Fingerprints | None = None,
              fresh: bool = False) -> dict:
    """Run one stage and write its manifest (last). `fresh`: discard earlier outputs and
    recompute everything. Returns the manifest."""
    from pipeline.runtime import seed_everything

    prints = prints or Fingerprints(cfg)
    fp = prints.of(spec.name)
    started = started_path(cfg, spec.name)
    artifacts = catalogue_of(cfg)
    # Outputs and checkpoints are reused only when made under the same fingerprint.
    resume = not fresh and started.exists() and load_json(started).get("fingerprint") == fp
    module = spec.load()
    ctx = make_context(cfg, spec, runtime, fp, resume=resume)
    if hasattr(module, "check"):
        module.check(ctx)          # inputs a user can break (weights files): fail before touching anything
    runtime.barrier()
    if runtime.is_main:
        artifacts.manifest.path(spec.name).unlink(missing_ok=True)
        if not resume:
            discard_outputs(cfg, spec, runtime)
        save_json(started, {"fingerprint": fp})
    runtime.barrier()
    seed_everything(stage_seed(cfg.seed, spec.name) + runtime.rank)
    log.info("== %s (%s)", spec.name, "resuming" if resume else "fresh")
    t0 = time.time()
    summary = module.run(ctx) or {}
    runtime.barrier()
    wall = time.time() - t0
    manifest = {
        "stage": spec.name,
        "fingerprint": fp,
        "parts": prints.parts(spec.name),
        "run_id": uuid.uuid4().hex,
        "upstream": {u: {"fingerprint": (read_manifest(cfg, u) or {}).get("fingerprint"),
                         "run_id": (read_manifest(cfg, u) or {}).get("run_id")} for u in spec.reads},
        "outputs": summary.get("outputs", {}),
        "metrics": summary.get("metrics", {}),
        "wall_time_s": round(wall, 2),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if runtime.is_main:
        artifacts.manifest.write(spec.name, manifest)
    runtime.barrier()
    log.info("== %s done in %.1f s", spec.name, wall)
    return manifest


def run_pipeline(cfg: Config, runtime, plan: list[StageSpec], force: bool = False, force_names=(),
                 explicit=()) -> list[str]:
    """Run the planned stages in order, skipping the current ones. Returns the names run."""
    plan = preflight(cfg, plan, runtime, explicit=explicit)
    if runtime.is_main:
        dump_config(cfg, cfg.result_dir / "config.yaml")
    ran = []
    for spec in plan:
        prints = Fingerprints(cfg)      # upstream stages may have just re-run
        status = stage_status(cfg, spec.name, runtime, prints)
        forced = force or spec.name in force_names
        if status.done and not forced:
            log.info("== %s is current, skipped", spec.name)
            continue
        if status.state in ("stale", "incomplete"):
            log.info("== %s is %s: %s", spec.name, status.state, status.reason)
        try:
            run_stage(cfg, spec, runtime, prints, fresh=forced or status.state == "stale")
        except KeyboardInterrupt:
            raise PipelineError(
                f"interrupted during stage '{spec.name}'. Finished outputs are kept; resume with the same command.",
                exit_code=130) from None
        ran.append(spec.name)
    return ran


# ----------------------------------------------------------------------------- one run at a time

class RunLock:
    """An exclusive lock on result/<run>/.lock, held by rank 0 while a command writes the run: a
    second command on the same run is refused with one line instead of both writing every file.
    On entry, stale temporaries of interrupted writers are removed (nobody else is writing)."""

    def __init__(self, cfg: Config, runtime):
        self.path = cfg.result_dir / ".lock"
        self.folders = (cfg.result_dir, cfg.sess_dir)
        self.active = runtime.is_main
        self.handle = None

    def __enter__(self):
        if not self.active:
            return self
        try:
            import fcntl
        except ImportError:          # no advisory locks on this platform: run unlocked
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "another process"
            self.handle.close()
            self.handle = None
            raise PipelineError(f"run folder {self.path.parent} is in use by {holder}; wait for it to finish "
                                "(or use another run_name)") from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"process {os.getpid()}\n")
        self.handle.flush()
        from pipeline.artifacts import clean_stale_temporaries

        removed = clean_stale_temporaries(*self.folders)
        if removed:
            log.info("removed %d temporary file(s) left by an interrupted run", removed)
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        return False
