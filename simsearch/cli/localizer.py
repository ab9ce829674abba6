"""Localizer commands: synth, train-localizer, localize, evaluate, plot-boxes."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

import typer

from simsearch.cli.app import app, echo_json, echo_table, reported
from simsearch.cli.options import FORMAT_OPTION, HEAD_OPTION, INDEX_OPTION, QUIET_OPTION, Format


@app.command("synth")
def synth_command(
    out: Path = typer.Argument(..., help="VOC year folder to write (JPEGImages/, Annotations/, ImageSets/Main/)."),
    n: int = typer.Option(2000, "--n", min=1, help="Composites to write."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same images."),
    sources: List[Path] = typer.Option(..., "--sources", help="Folders with VOC or box-list datasets (object crops) and plain photos (backgrounds); repeatable, at least one."),
    backgrounds: List[Path] = typer.Option([], "--backgrounds", help="Folders of background photos; default: the box-less images under --sources."),
    classes: Optional[str] = typer.Option(None, "--classes", help="Comma-separated classes to paste; default: the --top-classes with most crops."),
    top_classes: int = typer.Option(8, "--top-classes", min=1, help="How many classes when --classes is not given."),
    objects: int = typer.Option(1, "--objects", min=1, help="Objects per image; extras are smaller distractors."),
    val_fraction: float = typer.Option(0.2, "--val-fraction", help="Share of composites in val (their crops come from photos train never uses)."),
    quiet: bool = QUIET_OPTION,
) -> None:
    """Paste real object crops onto real photos: a VOC folder with exact boxes, for training and measuring the localizer."""
    from simsearch.datasets.synth import SynthConfig, generate

    with reported():
        chosen = tuple(c.strip() for c in classes.split(",") if c.strip()) if classes else ()
        config = SynthConfig(out=out, sources=tuple(sources), backgrounds=tuple(backgrounds), n=n, seed=seed,
                             classes=chosen, top_classes=top_classes, val_fraction=val_fraction,
                             objects_per_image=objects)
        report = generate(config, progress=not quiet)
    echo_json(asdict(report))
    typer.echo(f"wrote {report.images} composites ({report.train} train, {report.val} val) to {out}", err=True)


@app.command("train-localizer")
def train_localizer_command(
    index: Path = INDEX_OPTION,
    epochs: int = typer.Option(40, "--epochs", min=1, help="At most this many epochs (early stopping ends sooner)."),
    patience: int = typer.Option(8, "--patience", min=1, help="Stop after this many epochs without a better validation loss."),
    val_split: str = typer.Option("val", "--val-split", help="images.split held out for validation; when no image has it, --val-fraction is used."),
    val_fraction: float = typer.Option(0.2, "--val-fraction", help="Share held out (by image hash) when the index has no such split."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=2, help="Default 64, or 16 with --every."),
    lr: float = typer.Option(1e-3, "--lr"),
    box_weight: float = typer.Option(2.0, "--box-weight", help="loss = cross-entropy + box_weight * (smooth-L1 + GIoU)."),
    every: bool = typer.Option(False, "--every", help="Train the dense head instead: objectness, class and box for every anchor of every grid cell, learnt from every non-difficult box, so localize stores every object found (per-class NMS, score >= --score-threshold), not only the largest; evaluate then reports mAP@0.5."),
    anchors: int = typer.Option(3, "--anchors", min=1, help="With --every: anchor shapes per grid cell (k-means of the training boxes)."),
    score_threshold: Optional[float] = typer.Option(None, "--score-threshold", min=0.0, max=1.0, help="With --every: detections scoring below this are not stored; default the score of best F1 on the validation images."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("cpu", "--device", help="auto, cpu or cuda."),
    quiet: bool = QUIET_OPTION,
    fmt: Format = typer.Option(Format.table, "--format", "-f", help="table: one summary line (for people); json: the full report with every epoch's losses (for scripts)."),
) -> None:
    """Train the localizer head on the index's cached feature maps and save it in the index folder.

    The default head names the largest object of an image and boxes it; --every trains a dense head that finds every
    object of its classes. stdout is one summary line; --format json prints the full report instead (the line then
    goes to stderr).
    """
    from simsearch.localizer.dense import DenseConfig
    from simsearch.localizer.train import TrainConfig, train

    with reported():
        report = train(TrainConfig(index_dir=index, epochs=epochs, patience=patience, batch_size=batch_size, lr=lr,
                                   box_weight=box_weight, val_split=val_split, val_fraction=val_fraction, seed=seed,
                                   device=device, quiet=quiet, target="every" if every else "largest",
                                   dense=DenseConfig(anchors=anchors, score_threshold=score_threshold)))
    if fmt is Format.json:  # ~10 KB: every epoch's losses, for scripts, never by default
        echo_json(asdict(report))
    if every:
        typer.echo(
            f"dense head {report.head_version}: {len(report.classes)} classes, {report.train_images} train / "
            f"{report.val_images} val images, best epoch {report.best_epoch} of {report.epochs_run}: val mAP@0.5 "
            f"{report.val_map:.3f}; best detection against the largest object: accuracy {report.val_accuracy:.3f}, "
            f"CorLoc {report.val_corloc:.3f}; detections scoring below {report.calibration['threshold']:.2f} are not "
            f"stored; {report.seconds:.1f}s. Next: simsearch localize --index {index}", err=fmt is Format.json)
        return
    typer.echo(
        f"head {report.head_version}: {len(report.classes)} classes, {report.train_images} train / "
        f"{report.val_images} val images, best epoch {report.best_epoch} of {report.epochs_run}: val accuracy "
        f"{report.val_accuracy:.3f}, CorLoc {report.val_corloc:.3f}; temperature "
        f"{report.calibration['temperature']:.2f}: val ECE {report.calibration['ece_before']:.3f} -> "
        f"{report.calibration['ece_after']:.3f}, \"unknown\" below score {report.calibration['threshold']:.2f} "
        f"or familiarity {report.calibration['familiarity_threshold']:.2f}; "
        f"{report.seconds:.1f}s. "
        f"Next: simsearch localize --index {index}", err=fmt is Format.json)


@app.command("localize")
def localize_command(
    index: Path = INDEX_OPTION,
    head: Optional[Path] = typer.Option(None, "--head", help="Folder holding localizer.pt, e.g. an index of labelled data it was trained on; it is copied into --index, which then uses it for new images and queries. Default: the index's own head."),
) -> None:
    """Predict class, score and box for every record and store them (query results then show them)."""
    from simsearch.localizer.predict import localize

    with reported():
        report = localize(index, head)
    echo_json(asdict(report))
    typer.echo(f"{report.predicted} predictions ({report.boxes} predicted boxes) stored (head {report.head_version}) "
               f"in {report.seconds:.1f}s", err=True)


@app.command("evaluate")
def evaluate_command(
    index: Path = INDEX_OPTION,
    split: str = typer.Option("val", "--split", help="val / train (the head's own held-out / training images), all, or a split name."),
    head: Optional[Path] = HEAD_OPTION,
    open_set: bool = typer.Option(False, "--open-set", help="Instead: train a throwaway head without --hold-out classes and report how often their images come out \"unknown\" (the index's head is left alone)."),
    hold_out: Optional[str] = typer.Option(None, "--hold-out", help="Comma-separated classes for --open-set; default the first two by name."),
    epochs: int = typer.Option(30, "--epochs", min=1, help="Epochs of the --open-set head."),
    seed: int = typer.Option(0, "--seed", help="Seed of the --open-set head."),
    val_fraction: float = typer.Option(0.2, "--val-fraction", help="Share held out for validation by the --open-set head when the index has no val split."),
    fmt: Format = FORMAT_OPTION,
) -> None:
    """Top-1 accuracy, calibration (ECE), "unknown" share, mean IoU, CorLoc (IoU >= 0.5), mAP@0.5 over every box, per class and a confusion matrix."""
    from simsearch.localizer.evaluate import evaluate, open_set as measure_open_set
    from simsearch.localizer.train import TrainConfig

    if open_set:
        with reported():
            chosen = tuple(c.strip() for c in hold_out.split(",") if c.strip()) if hold_out else ()
            report = measure_open_set(TrainConfig(index_dir=index, epochs=epochs, seed=seed, quiet=True,
                                                  val_fraction=val_fraction), chosen)
        if fmt is Format.json:
            echo_json(asdict(report))
            return
        typer.echo(f"held out {', '.join(report.held_out)}: {report.held_out_images} images, "
                   f"{report.held_out_unknown_rate:.3f} \"unknown\" (score threshold alone "
                   f"{report.held_out_unknown_rate_score_only:.3f}; mean score {report.held_out_mean_score:.2f})")
        typer.echo(f"known classes: {report.known_images} val images, accuracy {report.known_accuracy:.3f} without "
                   f"the thresholds, {report.known_accuracy_kept:.3f} right and kept with them "
                   f"({report.known_unknown_rate:.3f} \"unknown\"; score threshold alone "
                   f"{report.known_unknown_rate_score_only:.3f}); T {report.temperature:.2f}, score threshold "
                   f"{report.threshold:.2f}, familiarity threshold {report.familiarity_threshold:.2f}, "
                   f"val ECE {report.ece_before:.3f} -> {report.ece_after:.3f}")
        return
    with reported():
        result = evaluate(index, split, head)
    if fmt is Format.json:
        echo_json(result.to_dict())
        return
    dense = result.extra["target"] == "every"
    boxes = sum(row["boxes"] for row in result.detection)
    typer.echo(f"mAP@0.5 {result.map50:.4f} over {len(result.detection)} classes, {boxes} boxes"
               + ("" if dense else " (the single-object head: its one box is its only detection)"))
    typer.echo(f"images {result.n}  accuracy {result.accuracy:.4f}  mean IoU {result.mean_iou:.4f}  "
               f"CorLoc {result.corloc:.4f}  (majority-class accuracy {result.extra['chance_accuracy']:.4f})"
               + ("  (best detection against the largest object)" if dense else ""))
    if result.ece is not None:
        typer.echo(f"ECE {result.ece:.4f} (uncalibrated {result.ece_uncalibrated:.4f}, temperature "
                   f"{result.extra['temperature']:.2f})  \"unknown\" {result.unknown_rate:.4f} (score below "
                   f"{result.extra['threshold']:.2f} or familiarity below {result.extra['familiarity_threshold']:.2f})  "
                   f"right and kept {result.accuracy_kept:.4f}")
    typer.echo("")
    ap = {row["label"]: row for row in result.detection}
    rows = [{**asdict(c), "boxes": ap.get(c.label, {}).get("boxes", 0), "ap": ap.get(c.label, {}).get("ap")}
            for c in result.per_class]
    rows += [{"label": c, "n": 0, "boxes": row["boxes"], "ap": row["ap"]} for c, row in ap.items()
             if c not in {r["label"] for r in rows}]
    echo_table(sorted(rows, key=lambda r: r["label"]),
               ["label", "n", "accuracy", "mean_iou", "corloc", "predicted", "boxes", "ap"])
    typer.echo("")
    typer.echo("confusion (rows: actual, columns: predicted)")
    short = [c[:6] for c in result.classes]
    echo_table([{"actual": c, **dict(zip(short, row))} for c, row in zip(result.classes, result.confusion)],
               ["actual", *short])


@app.command("plot-boxes")
def plot_boxes_command(
    index: Path = INDEX_OPTION,
    n: int = typer.Option(16, "--n", min=1, help="Images in the grid."),
    out: Path = typer.Option(Path("figures"), "--out", help="Folder for boxes.png."),
    split: str = typer.Option("val", "--split", help="val, train, all or a split name."),
    seed: int = typer.Option(0, "--seed", help="Which images are drawn."),
    head: Optional[Path] = HEAD_OPTION,
) -> None:
    """PNG grid: actual box red, predicted box blue, captions with both classes and the score."""
    from simsearch.views.plots import plot_boxes

    with reported():
        report = plot_boxes(index, out, n, split, seed, head_dir=head)
    echo_json(asdict(report))
    typer.echo(f"wrote {report.path} ({report.images} images, {report.width}x{report.height})", err=True)
