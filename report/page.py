"""Run report: one self-contained HTML page per run, `result/<run>/report/index.html`.

    python run_pipeline.py report --config FILE [--n-images N]

The page shows the run's configuration, every stage's state and wall time (from the
manifests), per-class IoU of each evaluation stage (table + bar chart), the CAM
threshold sweep, and, for N sample images of the eval split: the image, a CAM heat
map per class, the IR label, the pseudo label, the DeepLab + CRF prediction and the
ground truth. Pictures are PNG files in `report/img/` beside the page; no network,
no JavaScript. A stage that has not run is shown as "not run" and a missing file as
"not available": the report never fails because the run is partial.
"""
from __future__ import annotations

import html
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np

from pipeline import artifacts
from pipeline.catalogue import Catalogue
from dataset.classes import IGNORE_LABEL
from pipeline.config import Config, config_to_dict
from pipeline.errors import PipelineError
from report.pictures import (STAGE_COLOURS, THUMB_SIDE, UNSURE_RGB, cam_overlay, colorize_label, fit,  # noqa: F401
                             iou_chart, save_png, sweep_chart)

log = logging.getLogger("wsss")

# (metric file / stage name, column title), in pipeline order
EVAL_STAGES = (
    ("eval_cam", "CAM"),
    ("eval_sem_seg", "Pseudo labels"),
    ("test_seg_head", "Seg head"),
    ("crf_seg_head", "Seg head + CRF"),
    ("test_deeplab", "DeepLab"),
    ("crf", "DeepLab + CRF"),
)
HAS_MANIFEST = ("done", "incomplete", "stale")
NOT_RUN_STATES = ("not run", "disabled", "not in this method")


@dataclass(frozen=True)
class _NotInMethod:
    """The status of a stage the run's method does not have."""
    name: str = ""
    state: str = "not in this method"
    reason: str = ""
    manifest: dict | None = None


NOT_IN_METHOD = _NotInMethod()


# ----------------------------------------------------------------------------- data gathering

@dataclass
class _Page:
    """The report folder being written: remembers every picture, so stale ones can be removed."""
    dir: Path
    written: set = field(default_factory=set)

    @property
    def img_dir(self) -> Path:
        return self.dir / "img"

    def picture(self, name: str, rgb: np.ndarray) -> str:
        save_png(self.img_dir / name, rgb)
        return self._src(name)

    def figure(self, name: str, draw, *args) -> str:
        draw(self.img_dir / name, *args)
        return self._src(name)

    def _src(self, name: str) -> str:
        self.written.add(name)
        return "img/" + quote(name)

    def remove_leftovers(self) -> None:
        if self.img_dir.is_dir():
            for old in self.img_dir.glob("*.png"):
                if old.name not in self.written:
                    old.unlink(missing_ok=True)


def _statuses(cfg: Config, runtime) -> dict:
    from pipeline.runner import StageStatus, method_of, stage_status

    out = {}
    for name in method_of(cfg).stage_names:
        try:
            out[name] = stage_status(cfg, name, runtime)
        except Exception as e:   # e.g. data root gone, odd manifest: still report what the manifest says
            try:
                from pipeline.runner import read_manifest

                manifest = read_manifest(cfg, name)
            except PipelineError:
                manifest = None
            out[name] = StageStatus(name, "unknown", str(e), manifest)
    return out


def _metrics(cfg: Config, statuses: dict) -> dict:
    """stage -> metric record, only for stages with a manifest (a 'not run' stage's old file is ignored)."""
    out = {}
    metric_files = Catalogue(cfg.result_dir, cfg.sess_dir).metrics
    for stage, _ in EVAL_STAGES:
        status = statuses.get(stage)
        if status is None or status.manifest is None or not metric_files.exists(stage):
            continue
        try:
            record = metric_files.read(stage)
        except PipelineError as e:
            log.warning("report: %s", e)
            continue
        if isinstance(record, dict) and isinstance(record.get("per_class_iou"), dict):
            out[stage] = record
    return out


def pick_samples(ids: list[str], n: int) -> list[str]:
    """`n` ids spread evenly over the split (deterministic), all of them if there are fewer."""
    if n >= len(ids):
        return list(ids)
    return [ids[(i * len(ids)) // n] for i in range(n)]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _fmt_time(seconds) -> str:
    if seconds is None:
        return "–"
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def _e(value) -> str:
    return html.escape(str(value))


def _not_run_text(status) -> str | None:
    """Placeholder text when the stage that makes an artifact never ran, else None."""
    if status.state == "not run":
        return "not run"
    if status.state in NOT_RUN_STATES:
        return f"not run ({status.state})"
    return None


# ----------------------------------------------------------------------------- HTML pieces

CSS = """
body { font-family: -apple-system, "Segoe UI", "DejaVu Sans", Helvetica, Arial, sans-serif; margin: 24px auto;
       max-width: 1400px; padding: 0 16px; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; border-bottom: 2px solid #e3e3e3; padding-bottom: 4px; margin-top: 1.8em; }
h3 { font-size: 1.05em; margin: 0.2em 0 0.4em; }
.meta { color: #666; font-size: 0.9em; }
nav a { margin-right: 1em; }
table { border-collapse: collapse; font-size: 0.92em; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.total td { font-weight: bold; background: #fafafa; }
.best { font-weight: bold; }
.state { display: inline-block; padding: 0 8px; border-radius: 9px; font-size: 0.88em; white-space: nowrap; }
.s-done { background: #d8f0dc; color: #17612a; }
.s-incomplete, .s-stale { background: #fdeccc; color: #8a5a00; }
.s-not-run, .s-disabled, .s-not-implemented { background: #eeeeee; color: #666; }
.s-unknown { background: #f8d7da; color: #842029; }
.muted { color: #888; }
.note { color: #666; font-size: 0.9em; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 8px 0; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 6px 14px; min-width: 120px; }
.card .v { font-size: 1.5em; font-weight: bold; }
.card .k { color: #666; font-size: 0.85em; }
img.chart { max-width: 100%; border: 1px solid #eee; }
.sample { border: 1px solid #e3e3e3; border-radius: 6px; padding: 8px 12px; margin: 12px 0; }
.row { display: flex; flex-wrap: wrap; gap: 8px; align-items: flex-start; }
figure { margin: 0; text-align: center; }
figure img { display: block; border: 1px solid #ccc; }
figcaption { font-size: 0.8em; color: #444; max-width: __THUMB__px; margin: 2px auto 0; }
.na { display: flex; align-items: center; justify-content: center; background: #f3f3f3; color: #888;
      border: 1px dashed #bbb; font-size: 0.85em; }
.legend { font-size: 0.85em; margin-top: 6px; }
.legend span.item { margin-right: 12px; white-space: nowrap; }
.sw { display: inline-block; width: 12px; height: 12px; border: 1px solid #777; vertical-align: -1px;
      margin-right: 4px; }
.jet { display: inline-block; width: 120px; height: 10px; vertical-align: middle; border: 1px solid #999;
       background: linear-gradient(to right, #00007f, #0000ff, #00ffff, #7fff7f, #ffff00, #ff0000, #7f0000); }
pre { background: #f7f7f7; padding: 8px; font-size: 0.85em; overflow-x: auto; }
"""


def _state_badge(state: str) -> str:
    return f'<span class="state s-{state.replace(" ", "-")}">{_e(state)}</span>'


def _figure(src: str | None, caption: str, size_hw=(THUMB_SIDE, THUMB_SIDE), placeholder: str = "not available") -> str:
    if src is None:
        h, w = size_hw
        body = f'<div class="na" style="width:{w}px;height:{h}px">{_e(placeholder)}</div>'
    else:
        body = f'<img src="{src}" alt="{_e(caption)}">'
    return f"<figure>{body}<figcaption>{_e(caption)}</figcaption></figure>"


def _swatch(rgb) -> str:
    r, g, b = (int(x) for x in rgb)
    return f'<span class="sw" style="background:rgb({r},{g},{b})"></span>'


def _legend(label_ids: set[int], class_names, with_jet: bool, ignore_in=()) -> str:
    palette = artifacts.voc_palette()
    items = []
    for lid in sorted(i for i in label_ids if i != IGNORE_LABEL):
        name = class_names[lid] if lid < len(class_names) else f"label {lid}"
        items.append(f'<span class="item">{_swatch(palette[lid])}{_e(name)}</span>')
    if ignore_in:
        items.append(f'<span class="item">{_swatch(UNSURE_RGB)}{_e(" / ".join(ignore_in))}</span>')
    if with_jet:
        items.append('<span class="item">CAM 0 <span class="jet"></span> 1</span>')
    return f'<div class="legend"><b>Legend:</b> {"".join(items)}</div>'


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and k != "model_kwargs":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_drift(cfg: Config) -> list[tuple[str, object, object]]:
    """(key, this config's value, value recorded in result/<run>/config.yaml) for every key that differs."""
    from pipeline.config import load_config

    recorded_path = cfg.result_dir / "config.yaml"
    if not recorded_path.exists():
        return []
    try:
        recorded = _flatten(config_to_dict(load_config(recorded_path)))
    except PipelineError as e:
        log.warning("report: cannot compare with %s: %s", recorded_path, e)
        return []
    current = _flatten(config_to_dict(cfg))
    return [(k, current.get(k), recorded.get(k)) for k in sorted(set(current) | set(recorded))
            if current.get(k) != recorded.get(k)]


def _config_section(cfg: Config, deeplab_split: str) -> str:
    d, tc = cfg.data, cfg.train_cam
    rows = [
        ("run name", cfg.run_name),
        ("result folder", cfg.result_dir),
        ("device / seed", f"{cfg.device} / {cfg.seed}"),
        ("dataset", d.dataset),
        ("data root", d.root),
        ("splits", f"train {d.train_split} · infer {d.infer_split} · eval {d.eval_split} · val {d.val_split}"
                   f" · DeepLab test {deeplab_split}"),
        ("method", cfg.method),
    ]
    if cfg.method == "crt":
        rows += [
            ("CAM network", f"CNN {tc.cnn.backbone} (pretrained: {tc.cnn.pretrained}) + ViT {tc.vit.name} "
                            f"(pretrained: {tc.vit.pretrained}); {tc.epochs} epochs, {tc.optimizer.kind}, "
                            f"lr {tc.optimizer.lr}"),
            ("IR labels", f"fg {cfg.cam_to_ir_label.conf_fg_thres} / bg {cfg.cam_to_ir_label.conf_bg_thres}"),
            ("IRNet", f"{cfg.train_irn.backbone} (pretrained: {cfg.train_irn.pretrained}), {cfg.train_irn.epochs} "
                      f"epochs; random walk radius {cfg.make_sem_seg.walk.radius}, β {cfg.make_sem_seg.walk.beta}, "
                      f"2^{cfg.make_sem_seg.walk.exp_times} steps, bg {cfg.make_sem_seg.bg_threshold}"),
        ]
    else:
        tn = cfg.train_net
        on = ", ".join(f"{name} ×{term.weight:g} from {term.start}" for name, term in vars(tn.losses).items()
                       if term.weight > 0)
        rows += [
            ("network", f"{tn.backbone} (pretrained: {tn.pretrained}), aux block {tn.aux_layer}; {tn.iterations} "
                        f"iterations, batch {tn.batch_size}, crop {tn.crop_size}, {tn.optimizer.kind} lr "
                        f"{tn.optimizer.lr}"),
            ("losses", on),
            ("pseudo labels", f"source {cfg.make_sem_seg.source}; refiner {tn.refiner.preset}, thresholds "
                              f"{tn.thresholds.low} / {tn.thresholds.high}"),
        ]
    rows += [
        ("CAMs", f"source {cfg.make_cam.cam_source}, scales {cfg.make_cam.scales}, "
                 f"eval threshold {cfg.eval_cam.threshold}"),
        ("DeepLab", f"{cfg.train_deeplab.backbone} (pretrained: {cfg.train_deeplab.pretrained}), "
                    f"{cfg.train_deeplab.iterations} iterations, batch {cfg.train_deeplab.batch_size}"
                    f"×{cfg.train_deeplab.accumulation}, crop {cfg.train_deeplab.crop_size}"),
    ]
    import yaml

    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    full = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    drift = config_drift(cfg)
    note = ""
    if drift:
        items = "".join(f"<li><code>{_e(k)}</code>: {_e(now)} here, {_e(then)} in the run's last config.yaml</li>"
                        for k, now, then in drift)
        note = (f'<p class="note">This config differs from {_e(cfg.result_dir / "config.yaml")} (written by the last '
                f"<code>run</code>); stages it affects are shown as stale:</p><ul class=note>{items}</ul>")
    return (f'<h2 id="config">Configuration</h2><table>{body}</table>{note}'
            f"<details><summary>Full resolved configuration</summary><pre>{_e(full)}</pre></details>")


def _status_section(statuses: dict) -> str:
    rows, total = [], 0.0
    for name, st in statuses.items():
        m = st.manifest or {}
        wall = m.get("wall_time_s")
        if wall is not None and st.state in HAS_MANIFEST:
            total += float(wall)
        metrics = m.get("metrics") or {}
        headline = (f"mIoU {metrics['miou']:.2f}%" if "miou" in metrics else
                    f"mAP {metrics['map']:.2f}%" if "map" in metrics else "")
        rows.append(
            f"<tr><td>{_e(name)}</td><td>{_state_badge(st.state)}</td><td class=num>{_e(_fmt_time(wall))}</td>"
            f"<td>{_e(m.get('finished_at', '–'))}</td><td>{_e(headline)}</td>"
            f"<td class=note>{_e(st.reason)}</td></tr>")
    return (f'<h2 id="stages">Stages</h2><table><tr><th>stage</th><th>state</th><th class=num>wall time</th>'
            f"<th>finished at</th><th>metric</th><th>note</th></tr>{''.join(rows)}"
            f'<tr class="total"><td>total</td><td></td><td class=num>{_e(_fmt_time(total))}</td>'
            f"<td></td><td></td><td></td></tr></table>")


def _quality_section(page: _Page, cfg: Config, statuses: dict, metrics: dict, class_names) -> str:
    parts = ['<h2 id="quality">Segmentation quality (IoU %)</h2>']
    cards = []
    eval_stages = [(stage, title) for stage, title in EVAL_STAGES if stage in statuses]   # the method's
    for stage, title in eval_stages:
        if stage in metrics:
            value = f'{metrics[stage]["miou"]:.1f}%'
        else:
            value = _not_run_text(statuses.get(stage, NOT_IN_METHOD)) or ("no metric" if statuses.get(stage, NOT_IN_METHOD).manifest else "not run")
        cards.append(f'<div class="card"><div class="k">{_e(title)} mIoU</div><div class="v">{_e(value)}</div></div>')
    parts.append(f'<div class="cards">{"".join(cards)}</div>')
    if not metrics:
        parts.append('<p class="muted">No evaluation stage has run yet: no per-class IoU to show.</p>')
        return "".join(parts)
    seen = {c for r in metrics.values() for c in r["per_class_iou"]}
    order = [c for c in class_names if c in seen] if class_names else []
    order += sorted(seen - set(order))
    head, sub = ["<th>class</th>"], ["<td class=note>split · images</td>"]
    for stage, title in eval_stages:
        st = statuses.get(stage, NOT_IN_METHOD)
        flag = f" ({st.state})" if st.state in ("stale", "incomplete", "unknown") else ""
        head.append(f'<th class=num><span class="sw" style="background:{STAGE_COLOURS[stage]}"></span>'
                    f"{_e(title + flag)}</th>")
        r = metrics.get(stage)
        if r is None:
            sub.append(f"<td class='num note'>{_e(_not_run_text(st) or 'no metric')}</td>")
        else:
            split = r.get("split") or cfg.data.eval_split
            sub.append(f"<td class='num note'>{_e(split)} · {_e(r.get('n_images', '?'))}</td>")
    rows = [f"<tr>{''.join(head)}</tr>", f"<tr>{''.join(sub)}</tr>"]

    def cells(values):
        present = [v for v in values if v is not None]
        top = max(present) if present else None
        out = []
        for v in values:
            if v is None:
                out.append("<td class='num muted'>–</td>")
            else:
                cls = "num best" if (len(present) > 1 and v == top) else "num"
                out.append(f"<td class='{cls}'>{v:.1f}</td>")
        return "".join(out)

    for c in order:
        values = [metrics[s]["per_class_iou"].get(c) if s in metrics else None for s, _ in eval_stages]
        rows.append(f"<tr><td>{_e(c)}</td>{cells(values)}</tr>")
    values = [metrics[s].get("miou") if s in metrics else None for s, _ in eval_stages]
    rows.append(f"<tr class='total'><td>mIoU</td>{cells(values)}</tr>")
    parts.append(f"<table>{''.join(rows)}</table>")
    parts.append('<p class="note">Bold: best stage for that class. CAM and pseudo labels are scored on the eval '
                 'split, DeepLab on its test split, so the columns need not cover the same images.</p>')
    series = [(s, t, metrics[s]) for s, t in eval_stages if s in metrics]
    try:
        src = page.figure("iou_per_class.png", iou_chart, order, series)
        parts.append(f'<img class="chart" src="{src}" alt="per-class IoU chart">')
    except Exception as e:  # a plotting failure must not lose the page
        log.warning("report: IoU chart failed: %s", e)
        parts.append(f'<p class="muted">chart not available ({_e(e)})</p>')
    return "".join(parts)


def _sweep_section(page: _Page, statuses: dict, metrics: dict) -> str:
    parts = ['<h2 id="sweep">CAM threshold sweep</h2>']
    record = metrics.get("eval_cam")
    if record is None:
        text = _not_run_text(statuses.get("eval_cam", NOT_IN_METHOD)) or "not available"
        parts.append(f'<p class="muted">eval_cam: {_e(text)}.</p>')
    elif not record.get("sweep"):
        parts.append('<p class="muted">eval_cam recorded no sweep: not available.</p>')
    else:
        try:
            src = page.figure("cam_sweep.png", sweep_chart, record)
            parts.append(f'<img class="chart" src="{src}" alt="CAM threshold sweep">')
        except Exception as e:
            log.warning("report: sweep chart failed: %s", e)
            parts.append(f'<p class="muted">chart not available ({_e(e)})</p>')
        parts.append(f'<p class="note">mIoU {record.get("miou", float("nan")):.2f}% at the configured threshold '
                     f'{record.get("threshold")}; best {record.get("best_miou", float("nan")):.2f}% at '
                     f'{record.get("best_threshold")}.</p>')
        parts.append(_sources_table(record))
    return "".join(parts)


SOURCE_TITLES = {"cnn": "CNN branch", "vit": "transformer branch", "fuse": "fusion of both", "net": "CAM head",
                 "aux": "auxiliary CAM head"}


def _sources_table(record: dict) -> str:
    """CAM mIoU of each source (what the co-training gives), when eval_cam recorded them."""
    sources = record.get("sources") or {}
    if not isinstance(sources, dict) or not sources:
        return ""
    rows = []
    for name, sub in sources.items():
        if not isinstance(sub, dict):
            continue
        miou, best = float(sub.get("miou", 0)), float(sub.get("best_miou", 0))
        rows.append(f"<tr><td>{_e(SOURCE_TITLES.get(name, name))}</td><td class=num>{miou:.2f}</td>"
                    f"<td class=num>{best:.2f}</td><td class=num>{_e(sub.get('best_threshold'))}</td></tr>")
    rows = "".join(rows)
    return ('<h3>CAM sources</h3><table><tr><th>source</th><th class=num>mIoU % at the threshold</th>'
            f'<th class=num>best mIoU %</th><th class=num>best threshold</th></tr>{rows}</table>')


def _load_label(path: Path):
    if not path.exists():
        return None
    try:
        return artifacts.load_label_png(path)
    except PipelineError as e:
        log.warning("report: %s", e)
        return None


class _Tiles:
    """The pictures of one sample: figures plus the label ids shown (for the legend)."""

    def __init__(self, page: _Page, stem: str, size_hw):
        self.page, self.stem, self.size_hw = page, stem, size_hw
        self.figs: list[str] = []
        self.labels: set[int] = set()
        self.ignore_in: list[str] = []     # which maps show 255: "unsure" (IR label), "ignore" (ground truth)

    def rgb(self, kind: str, rgb: np.ndarray, caption: str, nearest: bool = False) -> None:
        src = self.page.picture(f"{self.stem}_{kind}.png", fit(rgb, nearest=nearest))
        self.figs.append(_figure(src, caption))

    def label(self, kind: str, label, caption: str, missing: str | None, ignore_name: str = "ignore") -> None:
        """`label` (ids) or None; `missing` = the placeholder ("not run" ...) when None."""
        if label is None:
            self.figs.append(_figure(None, caption, self.size_hw, missing or "not available"))
            return
        ids = {int(v) for v in np.unique(label)}
        if IGNORE_LABEL in ids:
            ids.discard(IGNORE_LABEL)
            self.ignore_in.append(f"{ignore_name} ({caption.split(' (')[0]})")
        self.labels.update(ids)
        self.rgb(kind, colorize_label(label), caption, nearest=True)

    def missing(self, caption: str, text: str) -> None:
        self.figs.append(_figure(None, caption, self.size_hw, text))


def _stale(status) -> str:
    return f" ({status.state})" if status.state in ("stale", "incomplete", "unknown") else ""


def _sample_block(page: _Page, cfg: Config, dataset, statuses: dict, image_id: str, index: int) -> str:
    files = Catalogue(cfg.result_dir, cfg.sess_dir)
    stem = f"s{index:02d}_{_safe(image_id)}"
    try:
        image = dataset.load_image(image_id)
    except PipelineError as e:
        log.warning("report: %s", e)
        image = None
    if image is not None:
        h, w = fit(image).shape[:2]
    else:
        h = w = THUMB_SIDE
    tiles = _Tiles(page, stem, (h, w))
    if image is not None:
        tiles.rgb("image", image, "image")
    else:
        tiles.missing("image", "not available")

    names = dataset.class_names
    # CAM heat maps, one per class of the image
    st = statuses.get("make_cam", NOT_IN_METHOD)
    has_cam = False
    if _not_run_text(st):
        tiles.missing("CAM", _not_run_text(st))
    elif not files.cam.exists(image_id):
        tiles.missing("CAM", "not available")
    else:
        try:
            cam = files.cam.read(image_id)
        except PipelineError as e:
            log.warning("report: %s", e)
            cam = None
        if cam is None:
            tiles.missing("CAM", "not available")
        elif len(cam["keys"]) == 0:
            tiles.missing("CAM", "no class in this image")
        else:
            base = image if image is not None else np.zeros(cam["high_res"].shape[1:] + (3,), np.uint8)
            for key, plane in zip(cam["keys"], cam["high_res"]):
                lid = int(key) + 1
                name = names[lid] if lid < len(names) else f"class {lid}"
                tiles.labels.add(lid)
                tiles.rgb(f"cam{lid}", cam_overlay(base, plane), f"CAM: {name}" + _stale(st))
            has_cam = True

    for stage, kind, caption, path in (
        ("cam_to_ir_label", "ir", "IR label", files.ir_label.path(image_id)),
        ("make_sem_seg", "pseudo", "pseudo label", files.sem_seg.path(image_id)),
        ("crf", "crf", "DeepLab + CRF", files.crf_label.path(image_id)),
    ):
        if stage not in statuses:
            continue
        st = statuses.get(stage, NOT_IN_METHOD)
        not_run = _not_run_text(st)
        tiles.label(kind, None if not_run else _load_label(path), caption + ("" if not_run else _stale(st)), not_run,
                    "unsure" if kind == "ir" else "ignore")

    gt = _load_label(dataset.mask_path(image_id)) if hasattr(dataset, "mask_path") else None
    tiles.label("gt", gt, "ground truth", "not available")

    return (f'<div class="sample"><h3>{_e(image_id)}</h3><div class="row">{"".join(tiles.figs)}</div>'
            f"{_legend(tiles.labels, names, has_cam, tiles.ignore_in)}</div>")


def _deeplab_block(page: _Page, cfg: Config, dataset, image_id: str, index: int) -> str:
    files = Catalogue(cfg.result_dir, cfg.sess_dir)
    stem = f"d{index:02d}_{_safe(image_id)}"
    try:
        image = dataset.load_image(image_id)
    except PipelineError:
        image = None
    size = fit(image).shape[:2] if image is not None else (THUMB_SIDE, THUMB_SIDE)
    tiles = _Tiles(page, stem, size)
    if image is not None:
        tiles.rgb("image", image, "image")
    else:
        tiles.missing("image", "not available")
    tiles.label("deeplab", _load_label(files.prediction.path(image_id)), "DeepLab", None)
    tiles.label("crf", _load_label(files.crf_label.path(image_id)), "DeepLab + CRF", None)
    tiles.label("gt", _load_label(dataset.mask_path(image_id)), "ground truth", None)
    return (f'<div class="sample"><h3>{_e(image_id)}</h3><div class="row">{"".join(tiles.figs)}</div>'
            f"{_legend(tiles.labels, dataset.class_names, False, tiles.ignore_in)}</div>")


def _samples_section(page: _Page, cfg: Config, dataset, statuses: dict, n_images: int, deeplab_split: str) -> str:
    split = cfg.data.eval_split
    parts = [f'<h2 id="samples">Sample images (eval split \'{_e(split)}\')</h2>']
    if dataset is None:
        parts.append('<p class="muted">Data set not available: no sample images.</p>')
        return "".join(parts)
    try:
        ids = dataset.ids(split)
    except PipelineError as e:
        parts.append(f'<p class="muted">Split not available: {_e(e)}</p>')
        return "".join(parts)
    chosen = pick_samples(ids, n_images)
    if not chosen:
        parts.append('<p class="muted">No sample requested (--n-images 0).</p>')
        return "".join(parts)
    parts.append(f'<p class="note">{len(chosen)} of {len(ids)} images, spread evenly over the split. '
                 f'Label maps use the VOC palette; grey = unsure (IR label) or ignore (ground truth).')
    show_deeplab = deeplab_split != split and statuses.get("test_deeplab", NOT_IN_METHOD).manifest is not None
    if show_deeplab:
        parts.append(f" DeepLab + CRF predictions exist for the DeepLab test split '{_e(deeplab_split)}' only, "
                     "so they are shown for the images of that split below.")
    parts.append("</p>")
    for k, image_id in enumerate(chosen):
        parts.append(_sample_block(page, cfg, dataset, statuses, image_id, k))

    if show_deeplab:
        parts.append(f'<h2 id="deeplab">DeepLab on its test split \'{_e(deeplab_split)}\'</h2>')
        try:
            dl_ids = dataset.ids(deeplab_split)
        except PipelineError as e:
            parts.append(f'<p class="muted">Split not available: {_e(e)}</p>')
            return "".join(parts)
        for k, image_id in enumerate(pick_samples(dl_ids, n_images)):
            parts.append(_deeplab_block(page, cfg, dataset, image_id, k))
    return "".join(parts)


# ----------------------------------------------------------------------------- entry point

def write_report(cfg: Config, n_images: int = 6, runtime=None) -> Path:
    """Write `result/<run>/report/index.html` (and its pictures in report/img/). Returns the page's path."""
    if n_images < 0:
        raise PipelineError(f"--n-images must be >= 0, got {n_images}")
    if runtime is None:
        from pipeline.runtime import init_runtime

        runtime = init_runtime("cpu")
    from dataset.registry import build_dataset

    t0 = time.time()
    page = _Page(cfg.result_dir / "report")
    statuses = _statuses(cfg, runtime)
    metrics = _metrics(cfg, statuses)
    try:
        dataset = build_dataset(cfg.data)
        class_names = list(dataset.class_names)
        data_note = ""
    except PipelineError as e:
        dataset, class_names = None, []
        data_note = f'<p class="muted">Data set not available: {_e(e)}</p>'
    manifest = statuses.get("test_deeplab", NOT_IN_METHOD).manifest or {}
    deeplab_split = (manifest.get("outputs") or {}).get("split") or cfg.test_deeplab.split or cfg.data.val_split

    sections = [
        _config_section(cfg, deeplab_split),
        data_note,
        _status_section(statuses),
        _quality_section(page, cfg, statuses, metrics, class_names),
        _sweep_section(page, statuses, metrics),
        _samples_section(page, cfg, dataset, statuses, n_images, deeplab_split),
    ]
    nav = " ".join(f'<a href="#{a}">{t}</a>' for a, t in (
        ("config", "Configuration"), ("stages", "Stages"), ("quality", "IoU"), ("sweep", "CAM sweep"),
        ("samples", "Samples")))
    title = f"WSSS run report: {cfg.run_name}"
    doc = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
           f"<style>{CSS.replace('__THUMB__', str(THUMB_SIDE))}</style></head><body><h1>{_e(title)}</h1>"
           f'<p class="meta">generated {time.strftime("%Y-%m-%d %H:%M:%S")} from {_e(cfg.result_dir)}</p>'
           f"<nav>{nav}</nav>{''.join(sections)}</body></html>\n")
    path = page.dir / "index.html"
    with artifacts.atomic_path(path) as tmp:
        tmp.write_text(doc, encoding="utf-8")
    page.remove_leftovers()
    log.info("report: %s (%d pictures) in %.1f s", path, len(page.written), time.time() - t0)
    return path
