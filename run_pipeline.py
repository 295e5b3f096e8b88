"""WSSS pipeline driver: CLI -> config -> runtime -> stages.

    python run_pipeline.py run --config configs/voc12.yaml [--set K=V]... [--only S]... [--skip S]... [--from S] [--to S] [--force]
    python run_pipeline.py stage make_cam --config configs/voc12.yaml
    python run_pipeline.py status --config configs/voc12.yaml
    python run_pipeline.py export --config configs/voc12.yaml --dest DIR [--copy]
    python run_pipeline.py report --config configs/voc12.yaml [--n-images N]
    python run_pipeline.py demo-data --out DIR [--train N] [--val N] [--seed S] [--layout voc|coco|folder]
    python run_pipeline.py demo [--config configs/demo.yaml]
The method (config key `method`, default crt) gives the stage list; `status` shows it.
Multi-GPU: torchrun --nproc_per_node=N run_pipeline.py run --config ...
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import List, Optional

import typer

from dataset.demo import DEMO_TRAIN, DEMO_VAL
from pipeline.errors import PipelineError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0])
log = logging.getLogger("wsss")

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"

ConfigOpt = typer.Option(..., "--config", "-c", help="YAML config file.")
SetOpt = typer.Option(None, "--set", help="Override a config key: --set train_cam.epochs=5 (repeatable).")


def one_line(message: str) -> str:
    """A message as one line. An error raised in a DataLoader worker arrives wrapped in the
    worker's traceback: keep its own last line."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if any(line.startswith("Original Traceback") for line in lines):
        lines = lines[-1:]
        lines[0] = lines[0].split(": ", 1)[-1] if lines[0].startswith(("pipeline.errors.", "PipelineError")) \
            else lines[0]
    return " ".join(lines)


def _fail(error) -> None:
    """One line on stderr and exit 2 (130 for an interruption)."""
    typer.echo(f"error: {one_line(str(error))}", err=True)
    raise typer.Exit(code=getattr(error, "exit_code", 2))


def _setup(config: Path, overrides: list[str] | None):
    from pipeline.config import load_config
    from pipeline.runtime import init_runtime, setup_logging

    cfg = load_config(config, overrides or [])
    runtime = init_runtime(cfg.device)
    setup_logging(cfg.result_dir / "logs", runtime.rank)
    log.info("run '%s' on %s (rank %d of %d)", cfg.run_name, runtime.device, runtime.rank, runtime.world_size)
    return cfg, runtime


def _run(config: Path, overrides, only=(), skip=(), from_stage=None, to_stage=None, force=False, force_names=()):
    from pipeline.runner import RunLock, run_pipeline, select_stages
    from pipeline.runtime import shutdown_runtime

    try:
        cfg, runtime = _setup(config, overrides)
        plan = select_stages(cfg, only=only, skip=skip, from_stage=from_stage, to_stage=to_stage)
        log.info("method %s, plan: %s", cfg.method, " -> ".join(s.name for s in plan))
        with RunLock(cfg, runtime):
            run_pipeline(cfg, runtime, plan, force=force, force_names=force_names, explicit=tuple(only))
        if runtime.is_main:
            _print_status(cfg, runtime)
    except PipelineError as e:
        _fail(e)
    finally:
        shutdown_runtime()


@app.command()
def run(
    config: Path = ConfigOpt,
    set_: Optional[List[str]] = SetOpt,
    only: Optional[List[str]] = typer.Option(None, "--only", help="Run only these stages (repeatable)."),
    skip: Optional[List[str]] = typer.Option(None, "--skip", help="Leave these stages out (repeatable)."),
    from_stage: Optional[str] = typer.Option(None, "--from", help="First stage to consider."),
    to_stage: Optional[str] = typer.Option(None, "--to", help="Last stage to consider."),
    force: bool = typer.Option(False, "--force", help="Re-run the selected stages even if current."),
):
    """Run the pipeline: every enabled stage in order, skipping the ones that are current."""
    _run(config, set_, only or (), skip or (), from_stage, to_stage, force)


@app.command()
def stage(
    name: str = typer.Argument(..., help="Stage name, e.g. make_cam."),
    config: Path = ConfigOpt,
    set_: Optional[List[str]] = SetOpt,
):
    """Re-run one stage, even if it is current (its upstream stages must be done)."""
    _run(config, set_, only=(name,), force_names=(name,))


def _print_status(cfg, runtime=None) -> None:
    from pipeline.runner import Fingerprints, stage_status

    prints = Fingerprints(cfg)
    typer.echo(f"run '{cfg.run_name}', method {cfg.method}  ({cfg.result_dir})")
    typer.echo(f"  {'stage':<17}{'state':<17}{'time':>9}  metric")
    for name in prints.method.stage_names:
        st = stage_status(cfg, name, runtime, prints)
        manifest = st.manifest or {}
        wall = manifest.get("wall_time_s")
        metric = manifest.get("metrics", {})
        headline = f"mIoU {metric['miou']:.2f}%" if "miou" in metric else (
            f"mAP {metric['map']:.2f}%" if "map" in metric else "")
        if st.state in ("stale", "incomplete") and st.reason:
            headline = f"{headline}  ({st.reason})".strip()
        typer.echo(f"  {name:<17}{st.state:<17}{(f'{wall:.1f}s' if wall is not None else '-'):>9}  {headline}")


@app.command()
def status(config: Path = ConfigOpt, set_: Optional[List[str]] = SetOpt):
    """Show each stage: done / incomplete / stale / not run, its wall time and headline metric."""
    from pipeline.config import load_config
    from pipeline.runtime import init_runtime

    try:
        cfg = load_config(config, set_ or [])
        _print_status(cfg, init_runtime("cpu"))
    except PipelineError as e:
        _fail(e)


@app.command()
def export(
    config: Path = ConfigOpt,
    dest: Path = typer.Option(..., "--dest", help="Folder to hold pseudo_seg_labels/ and the list file."),
    copy: bool = typer.Option(False, "--copy", help="Copy the PNGs instead of symlinking them."),
    set_: Optional[List[str]] = SetOpt,
):
    """Export the pseudo labels (make_sem_seg) as DEST/pseudo_seg_labels/ plus DEST/pseudo_seg_labels.txt."""
    from pipeline.config import load_config
    from pipeline.export import export_pseudo_labels
    from pipeline.runner import RunLock
    from pipeline.runtime import init_runtime, setup_logging

    try:
        cfg = load_config(config, set_ or [])
        setup_logging(None)
        runtime = init_runtime("cpu")
        with RunLock(cfg, runtime):
            summary = export_pseudo_labels(cfg, runtime, dest, copy=copy)
        typer.echo(f"exported {summary['n_images']} pseudo labels to {summary['labels_dir']} "
                   f"(list: {summary['list_file']}, classes: {summary['classes']}, "
                   f"{'copied' if copy else 'symlinked'})")
    except PipelineError as e:
        _fail(e)


@app.command()
def report(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config file of the run."),
    n_images: int = typer.Option(6, "--n-images", help="Sample images of the eval split to show."),
    compare: Optional[List[Path]] = typer.Option(
        None, "--compare", help="Config of a run to compare (repeatable, two or more): one page side by side."),
    out: Path = typer.Option(Path("result/compare"), "--out", help="Folder of the comparison page (--compare)."),
    set_: Optional[List[str]] = SetOpt,
):
    """Write result/<run>/report/index.html (status, per-class IoU per stage, sample images, CAM sweep), or
    with --compare A.yaml --compare B.yaml ... OUT/index.html: the runs side by side (stage metrics, wall
    times, per-class IoU, the same sample images)."""
    from pipeline.config import load_config
    from pipeline.runtime import setup_logging

    try:
        setup_logging(None)
        if compare:
            from report.compare import write_comparison

            if config is not None:
                compare = [config, *compare]
            path = write_comparison([load_config(c, set_ or []) for c in compare], out, n_images=n_images)
            typer.echo(f"comparison written: {path}")
            return
        if config is None:
            raise PipelineError("report needs --config FILE (one run) or --compare FILE --compare FILE (runs)")
        from report.page import write_report

        path = write_report(load_config(config, set_ or []), n_images=n_images)
        typer.echo(f"report written: {path}")
    except PipelineError as e:
        _fail(e)


@app.command("demo-data")
def demo_data(
    out: Path = typer.Option(..., "--out", help="Folder to write (the VOC2012-like root, or the COCO root)."),
    train: int = typer.Option(DEMO_TRAIN, "--train", help="Number of training images."),
    val: int = typer.Option(DEMO_VAL, "--val", help="Number of validation images."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same files)."),
    layout: str = typer.Option("voc", "--layout", help="voc, coco or folder (images/ + labels.csv + classes.txt)."),
):
    """Generate the synthetic demo data set (VOC, COCO or plain-folder layout)."""
    import time

    from dataset.demo import generate_demo_data

    try:
        t0 = time.time()
        summary = generate_demo_data(out, n_train=train, n_val=val, seed=seed, layout=layout)
        typer.echo(f"wrote {summary.get('n_train', train)} train + {summary.get('n_val', val)} val images "
                   f"({layout} layout) to {out} in {time.time() - t0:.1f} s")
    except PipelineError as e:
        _fail(e)


@app.command()
def demo(
    set_: Optional[List[str]] = SetOpt,
    config: Path = typer.Option(DEMO_CONFIG, "--config", help="Demo config."),
):
    """Generate the synthetic demo data if absent (or made by an older release with other sizes),
    then run the whole pipeline on the CPU."""
    from pipeline.config import load_config
    from dataset.demo import demo_data_mismatch, generate_demo_data

    try:
        cfg = load_config(config, set_ or [])
        root = Path(cfg.data.root)
        layout = {"coco": "coco", "folder": "folder"}.get(cfg.data.dataset, "voc")
        mismatch = demo_data_mismatch(root, seed=cfg.seed, layout=layout)   # "" without a demo marker
        if mismatch or not root.exists():
            # regenerated files are new inputs to the stages that read them: those stages rerun
            typer.echo(f"the demo data in {root} differs from this release's ({mismatch}): regenerating it ..."
                       if mismatch else f"generating demo data in {root} ...")
            generate_demo_data(root, seed=cfg.seed, layout=layout)
    except PipelineError as e:
        _fail(e)
    _run(config, set_)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted: finished outputs are kept; rerun the same command to resume", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
