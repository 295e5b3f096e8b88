"""Several runs side by side on one page: `python run_pipeline.py report --compare A.yaml --compare B.yaml`.

For a user choosing a method: each run's method and stage table (state, wall time, headline
metric), the mIoU of every evaluation stage, per-class IoU of each run's best evaluation
(table), and the same sample images of the eval split from each run (image, the run's
pseudo label and, where it has one, its final segmenter prediction, then the ground truth).
Runs should share the data set; a mismatch is said at the top of the page, not an error.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from pipeline import artifacts
from pipeline.catalogue import Catalogue
from pipeline.config import Config
from pipeline.errors import PipelineError
from report.page import (CSS, EVAL_STAGES, NOT_IN_METHOD, _e, _fmt_time, _load_label, _metrics, _Page, _safe,
                         _state_badge, _statuses, _Tiles, pick_samples)
from report.pictures import THUMB_SIDE, fit

log = logging.getLogger("wsss")

# The picture of a run's result per sample: the first of these its method has, in this order.
FINAL_PREDICTION = (("crf", "crf_label", "DeepLab + CRF"), ("test_deeplab", "prediction", "DeepLab"),
                    ("crf_seg_head", "seg_head_crf_label", "seg head + CRF"),
                    ("test_seg_head", "seg_head_prediction", "seg head"))


def _run_title(cfg: Config) -> str:
    return f"{cfg.run_name} ({cfg.method})"


def _headline(manifest: dict | None) -> str:
    metrics = (manifest or {}).get("metrics") or {}
    if "miou" in metrics:
        return f"{metrics['miou']:.2f}"
    if "map" in metrics:
        return f"mAP {metrics['map']:.2f}"
    return ""


def _stage_table(runs) -> str:
    names: list[str] = []
    for _, statuses, _ in runs:
        names += [n for n in statuses if n not in names]
    head = "".join(f"<th colspan=2>{_e(_run_title(cfg))}</th>" for cfg, _, _ in runs)
    rows = []
    for name in names:
        cells = []
        for _, statuses, _ in runs:
            st = statuses.get(name, NOT_IN_METHOD)
            wall = (st.manifest or {}).get("wall_time_s")
            cells.append(f"<td>{_state_badge(st.state)} {_e(_fmt_time(wall)) if wall is not None else ''}</td>"
                         f"<td class=num>{_e(_headline(st.manifest))}</td>")
        rows.append(f"<tr><td>{_e(name)}</td>{''.join(cells)}</tr>")
    total = []
    for _, statuses, _ in runs:
        seconds = sum((st.manifest or {}).get("wall_time_s") or 0 for st in statuses.values())
        total.append(f"<td><b>{_e(_fmt_time(seconds))}</b></td><td></td>")
    rows.append(f"<tr><td><b>total wall time</b></td>{''.join(total)}</tr>")
    return (f'<h2 id="stages">Stages (state, wall time, mIoU %)</h2><table><tr><th>stage</th>{head}</tr>'
            f"{''.join(rows)}</table>")


def _quality_table(runs, class_names) -> str:
    parts = ['<h2 id="quality">Segmentation quality (mIoU %)</h2>']
    head = "".join(f"<th class=num>{_e(_run_title(cfg))}</th>" for cfg, _, _ in runs)
    rows = []
    for stage, title in EVAL_STAGES:
        values = [metrics.get(stage, {}).get("miou") for _, _, metrics in runs]
        if all(v is None for v in values):
            continue
        best = max(v for v in values if v is not None)
        cells = "".join("<td class=num>-</td>" if v is None else
                        f"<td class=num>{'<b>' if v == best and len(runs) > 1 else ''}{v:.2f}"
                        f"{'</b>' if v == best and len(runs) > 1 else ''}</td>" for v in values)
        rows.append(f"<tr><td>{_e(title)} <span class=note>({_e(stage)})</span></td>{cells}</tr>")
    if not rows:
        parts.append('<p class="muted">No run has an evaluation yet.</p>')
        return "".join(parts)
    parts.append(f"<table><tr><th>evaluation</th>{head}</tr>{''.join(rows)}</table>")
    # per-class IoU of each run's pseudo labels (what a user exports) and of its final segmenter
    for stage, title in (("eval_sem_seg", "pseudo labels"), ("crf_seg_head", "seg head + CRF"),
                         ("crf", "DeepLab + CRF"), ("eval_cam", "CAMs")):
        records = [metrics.get(stage) for _, _, metrics in runs]
        if all(r is None for r in records):
            continue
        seen = [c for c in class_names if any(r and c in r.get("per_class_iou", {}) for r in records)]
        body = []
        for name in seen:
            cells = "".join("<td class=num>-</td>" if r is None or name not in r.get("per_class_iou", {}) else
                            f"<td class=num>{r['per_class_iou'][name]:.2f}</td>" for r in records)
            body.append(f"<tr><td>{_e(name)}</td>{cells}</tr>")
        parts.append(f"<h3>Per-class IoU %: {_e(title)} ({_e(stage)})</h3>"
                     f"<table><tr><th>class</th>{head}</tr>{''.join(body)}</table>")
    return "".join(parts)


def _samples(page: _Page, runs, dataset, n_images: int) -> str:
    first = runs[0][0]
    parts = [f'<h2 id="samples">The same sample images (eval split \'{_e(first.data.eval_split)}\')</h2>']
    if dataset is None or n_images == 0:
        parts.append('<p class="muted">No sample images.</p>')
        return "".join(parts)
    try:
        ids = pick_samples(dataset.ids(first.data.eval_split), n_images)
    except PipelineError as e:
        parts.append(f'<p class="muted">{_e(e)}</p>')
        return "".join(parts)
    for index, image_id in enumerate(ids):
        try:
            image = dataset.load_image(image_id)
            size = fit(image).shape[:2]
        except PipelineError:
            image, size = None, (THUMB_SIDE, THUMB_SIDE)
        tiles = _Tiles(page, f"c{index:02d}_{_safe(image_id)}", size)
        if image is not None:
            tiles.rgb("image", image, "image")
        for k, (cfg, statuses, _) in enumerate(runs):
            files = Catalogue(cfg.result_dir, cfg.sess_dir)
            tiles.label(f"r{k}_pseudo", _load_label(files.sem_seg.path(image_id)),
                        f"{cfg.run_name}: pseudo label", "not run" if "make_sem_seg" not in statuses else None)
            for stage, kind, caption in FINAL_PREDICTION:
                if stage in statuses and statuses[stage].manifest is not None:
                    tiles.label(f"r{k}_{kind}", _load_label(files[kind].path(image_id)),
                                f"{cfg.run_name}: {caption}", None)
                    break
        try:
            tiles.label("gt", dataset.load_mask(image_id), "ground truth", None)
        except PipelineError:
            tiles.missing("ground truth", "not available")
        parts.append(f'<div class="sample"><h3>{_e(image_id)}</h3><div class="row">{"".join(tiles.figs)}</div>'
                     "</div>")
    return "".join(parts)


def write_comparison(configs: list[Config], out_dir: Path, n_images: int = 4, runtime=None) -> Path:
    """Write OUT/index.html comparing the runs of `configs`. Returns the page's path."""
    if len(configs) < 2:
        raise PipelineError("--compare needs at least two runs (one --compare CONFIG each)")
    if n_images < 0:
        raise PipelineError(f"--n-images must be >= 0, got {n_images}")
    if runtime is None:
        from pipeline.runtime import init_runtime

        runtime = init_runtime("cpu")
    from dataset.registry import build_dataset

    t0 = time.time()
    runs = []
    for cfg in configs:
        statuses = _statuses(cfg, runtime)
        runs.append((cfg, statuses, _metrics(cfg, statuses)))
    datasets = {(cfg.data.dataset, str(Path(cfg.data.root).resolve()), cfg.data.eval_split) for cfg in configs}
    note = ""
    if len(datasets) > 1:
        note = ('<p class="warn">These runs do not share one data set and eval split: '
                f'{_e("; ".join(" ".join(d) for d in sorted(datasets)))}. Their figures are not comparable.</p>')
    try:
        dataset = build_dataset(configs[0].data)
        class_names = list(dataset.class_names)
    except PipelineError as e:
        dataset, class_names = None, []
        note += f'<p class="muted">Data set not available: {_e(e)}</p>'
    page = _Page(Path(out_dir))
    sections = [note, _stage_table(runs), _quality_table(runs, class_names), _samples(page, runs, dataset, n_images)]
    title = "WSSS runs compared: " + ", ".join(_run_title(cfg) for cfg in configs)
    doc = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
           f"<style>{CSS.replace('__THUMB__', str(THUMB_SIDE))}</style></head><body><h1>{_e(title)}</h1>"
           f'<p class="meta">generated {time.strftime("%Y-%m-%d %H:%M:%S")}</p>{"".join(sections)}</body></html>\n')
    path = page.dir / "index.html"
    with artifacts.atomic_path(path) as tmp:
        tmp.write_text(doc, encoding="utf-8")
    page.remove_leftovers()
    log.info("comparison: %s (%d runs, %d pictures) in %.1f s", path, len(configs), len(page.written),
             time.time() - t0)
    return path
