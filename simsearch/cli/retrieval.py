"""The evaluate-retrieval command: how good an index's neighbours are, measured on its own data."""
from __future__ import annotations

from pathlib import Path
from typing import List

import typer

from simsearch.cli.app import app, echo_json, echo_table, reported
from simsearch.cli.options import FORMAT_OPTION, INDEX_OPTION, QUIET_OPTION, Format


@app.command("evaluate-retrieval")
def evaluate_retrieval_command(
    index: Path = INDEX_OPTION,
    sample: int = typer.Option(50, "--sample", min=0, help="Images of the index edited for the near-duplicate part (each edited 10 ways: 10 forward passes an image)."),
    seed: int = typer.Option(0, "--seed", help="Fixes the near-duplicate sample, every edit's strength and the index part's stored sample."),
    skip: List[str] = typer.Option([], "--skip", help="Leave out a part: semantic, near-duplicates or index (repeatable)."),
    index_queries: int = typer.Option(200, "--index-queries", min=0, help="Stored vectors sampled as queries for the index part (self-match removed)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda (for embedding the edited images)."),
    fmt: Format = FORMAT_OPTION,
    quiet: bool = QUIET_OPTION,
) -> None:
    """Measure retrieval quality on an index: class retrieval (VOC protocol), near-duplicates (Copydays), FAISS recall.

    Semantic: every record with ground-truth boxes queries all the other labelled records, ranked by exact inner product over the stored vectors (the descriptor, not the ANN index); a result is relevant when it shares a class with the query. An index with a learned similarity (build-index --similarity auto, the default where 20+ images carry classes) would be scored on the very labels it learned from, so it is scored held out instead: each half of the labelled records searched with a fit on the other half, plain appearance on the same halves beside it. Mean average precision over the full ranking and precision@1/5/10, overall and per class (the queries holding it), beside the exact expectation of a random ranking. Byte-identical copies of the query are left out with it.

    Near-duplicates: --sample images of the index (seeded) are edited 10 ways (none, a control; crop to 50% and 75% of the area; 40% of one side cut; rotate 5-15 degrees; JPEG quality 10-50; scale to 25% and back; mirror; brightness, contrast and saturation x0.6-1.4; a caption), embedded with the index's own embedder and searched without being indexed: recall@1 and @5 of the original, per edit.

    Index: recall@10 of the FAISS index as queries use it, against exact search, for the edited images (held out) and for stored vectors with the self-match removed.

    Costs: the semantic part is O(n^2) in labelled records; the near-duplicate part is 10 forward passes per sampled image. Nothing is written to the index.
    """
    from simsearch.retrieval.evaluation import RetrievalEvalConfig, evaluate_retrieval, to_dict

    with reported():
        report = evaluate_retrieval(RetrievalEvalConfig(index_dir=index, sample=sample, seed=seed, skip=tuple(skip),
                                                        index_queries=index_queries, device=device, quiet=quiet))
    if fmt is Format.json:
        echo_json(to_dict(report))
        return
    _print_tables(to_dict(report))


def _print_tables(report: dict) -> None:
    """The report as three titled tables, for people."""
    typer.echo(f"{report['index']}: {report['records']} records, {report['backbone']}, {report['index_type']}, "
               f"seed {report['seed']} ({report['seconds']:.1f} s)")
    semantic = report["semantic"]
    if semantic is not None:
        typer.echo("")
        typer.echo(f"semantic: {semantic['queries']} of {semantic['labelled']} labelled records as queries, "
                   f"{semantic['classes']} classes; relevant = shares a class ({semantic['seconds']:.1f} s)")
        if semantic["note"]:
            typer.echo(f"  {semantic['note']}")
        if semantic["plain"] is not None:
            typer.echo(f"  ranked by the learned similarity, held out: each half of the labelled records searched with "
                       f"a fit on the other half; plain appearance on the same halves: mAP {semantic['plain']['map']}, "
                       f"P@1 {semantic['plain']['precision']['p@1']}")
        if semantic["overall"] is not None:
            rows = [_class_row(c) for c in [semantic["overall"], *semantic["per_class"]]]
            echo_table(rows, ["class", "queries", "mAP", "random mAP", "P@1", "P@5", "P@10", "random P@k"])
    near = report["near_duplicates"]
    if near is not None:
        typer.echo("")
        unreadable = f", {near['unreadable']} unreadable files left out" if near["unreadable"] else ""
        typer.echo(f"near-duplicates: {near['images']} images edited, queried without being indexed{unreadable}; "
                   f"the original is the one relevant result ({near['seconds']:.1f} s)")
        if near["note"]:
            typer.echo(f"  {near['note']}")
        if near["edits"]:
            echo_table([{"edit": e["edit"], "queries": e["queries"], "R@1": e["recall"]["r@1"],
                         "R@5": e["recall"]["r@5"], "score": e["mean_score"], "median rank": e["median_rank"]}
                        for e in near["edits"]], ["edit", "queries", "R@1", "R@5", "score", "median rank"])
    recall = report["index_recall"]
    if recall is not None:
        typer.echo("")
        typer.echo(f"index: {recall['index_type']} against exact search ({recall['seconds']:.1f} s)")
        if recall["note"]:
            typer.echo(f"  {recall['note']}")
        if recall["rows"]:
            echo_table([{"queries": r["queries"], "n": r["n"], "recall@k": r["recall"], "k": r["k"]}
                        for r in recall["rows"]], ["queries", "n", "k", "recall@k"])


def _class_row(scores: dict) -> dict:
    p = scores["precision"]
    return {"class": scores["label"], "queries": scores["queries"], "mAP": scores["map"],
            "random mAP": scores["random_map"], "P@1": p["p@1"], "P@5": p["p@5"], "P@10": p["p@10"],
            "random P@k": scores["random_precision"]}
