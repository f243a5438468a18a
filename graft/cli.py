"""The `graft` command: Graft's REST API from a terminal, through `graft.client`.

export GRAFT_URL=http://127.0.0.1:3000 GRAFT_API_KEY=graft_...
graft heads create flowers --from photos/        # one folder per label
graft predict HEAD_ID rose.jpg tulip.jpg
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from graft.client import DEFAULT_URL, Client, GraftError
from graft.inputs import AUDIO_SUFFIXES, Examples
from graft.schemas import HeadPublic, TrainingProgress

app = typer.Typer(help="Graft: per-tenant heads on shared backbones.", no_args_is_help=True)
tenants = typer.Typer(help="Tenants (admin key).", no_args_is_help=True)
heads = typer.Typer(help="Heads: create, list, show, delete.", no_args_is_help=True)
examples = typer.Typer(help="Add labelled examples to a head.", no_args_is_help=True)
app.add_typer(tenants, name="tenants")
app.add_typer(heads, name="heads")
app.add_typer(examples, name="examples")

out = Console(soft_wrap=True)  # a key or an id is never broken over lines
err = Console(stderr=True)

STAGES = {
    "embedding": "embedding examples",
    "fitting": "fitting the head",
    "fine_tuning": "fine-tuning its top",
    "adapting": "adapting to unlabelled examples",
}


@app.callback()
def main(
    ctx: typer.Context,
    url: Annotated[str, typer.Option(envvar="GRAFT_URL", help="the server")] = DEFAULT_URL,
    key: Annotated[
        str | None, typer.Option(envvar="GRAFT_API_KEY", help="a tenant's or the admin key")
    ] = None,
) -> None:
    ctx.obj = Client(url, key)
    ctx.call_on_close(ctx.obj.close)


def run() -> None:
    """The console script: an API error prints its code and message and exits 1."""
    try:
        app()
    except GraftError as exc:
        err.print(f"[red]error[/red] {exc.code}: {exc.message}")
        raise SystemExit(1) from None
    except httpx.TransportError as exc:  # no server there, or it went away
        err.print(f"[red]error[/red] cannot reach the server: {exc}")
        raise SystemExit(1) from None
    except (ValueError, OSError) as exc:  # a folder without examples, a missing file
        err.print(f"[red]error[/red] {exc}")
        raise SystemExit(1) from None


# Tenants ---------------------------------------------------------------------------------


@tenants.command("create")
def tenants_create(ctx: typer.Context, name: str) -> None:
    """Create a tenant; prints its API key (shown once)."""
    tenant = ctx.obj.create_tenant(name)
    out.print(f"tenant {tenant.id} ({tenant.name})")
    out.print(f"api key: {tenant.api_key}")


@tenants.command("list")
def tenants_list(ctx: typer.Context) -> None:
    table = Table("id", "name", "created")
    for tenant in ctx.obj.tenants():
        table.add_row(tenant.id, tenant.name, tenant.created_at)
    out.print(table)


# Heads -----------------------------------------------------------------------------------


def _with_progress(call):
    """Run `call(on_upload=, on_progress=)` under an upload bar and a training bar."""
    columns = (
        TextColumn("{task.description:<32}"),
        BarColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err) as bars:
        upload = bars.add_task("uploading", total=None, detail="")
        training = None

        def start_training() -> None:
            nonlocal training
            if training is None:
                bars.update(upload, description="uploaded")
                training = bars.add_task("training", total=None, detail="")

        def on_upload(sent: int, total: int) -> None:
            detail = f"{sent / 1e6:.1f}/{total / 1e6:.1f} MB"
            bars.update(upload, completed=sent, total=total, detail=detail)
            if sent == total:  # the server trains before it answers (up to 20 s), or 202s
                start_training()

        def on_progress(progress: TrainingProgress | None) -> None:
            start_training()
            if progress is not None:
                bars.update(
                    training,
                    description=STAGES.get(progress.stage, progress.stage),
                    completed=progress.done,
                    total=progress.total or None,
                    detail=f"{progress.done}/{progress.total}",
                )

        head = call(on_upload=on_upload, on_progress=on_progress)
        if training is not None:
            bars.update(training, description="trained", completed=1, total=1, detail="")
        return head


def _summary(head: HeadPublic) -> None:
    metrics = head.metrics
    out.print(f"head [bold]{head.id}[/bold] {head.name!r} v{head.version} on {head.backbone}")
    if metrics is None:
        return
    if metrics.cv_accuracy is None:
        out.print(f"held-out accuracy: not measured ({metrics.n_examples} examples)")
    else:
        margin = (
            "" if metrics.cv_accuracy_margin is None else f" ± {metrics.cv_accuracy_margin:.3f}"
        )
        out.print(
            f"held-out accuracy: [bold]{metrics.cv_accuracy:.3f}{margin}[/bold]"
            f" (95%, {metrics.n_examples} examples, {metrics.cv_folds} folds;"
            f" always the most common label: {metrics.majority_baseline:.3f})"
        )
    for warning in metrics.warnings:
        out.print(f"[yellow]warning[/yellow] {warning}")
    if head.status == "ready" and head.progress is not None:
        # An `auto` head serves this version while it compares more (README, Fine-tuning).
        out.print(
            f"a next version is on its way ({head.progress.stage}); this one serves meanwhile:"
            f" `graft heads show {head.id}` shows the latest"
        )


@heads.command("create")
def heads_create(
    ctx: typer.Context,
    name: str,
    from_dir: Annotated[
        Path,
        typer.Option("--from", help="one folder per label (images, clips, or .txt one per line)"),
    ],
    backbone: Annotated[str, typer.Option(help="a backbone id, or auto")] = "auto",
    fine_tune: Annotated[str, typer.Option(help="auto, on or off")] = "auto",
    unknown_keep: Annotated[
        float | None,
        typer.Option(help="share of its held-out examples the unknown threshold keeps"),
    ] = None,
) -> None:
    """Create a head from a folder per label; shows upload and training, then its accuracy."""
    found = Examples.from_dir(from_dir)
    err.print(f"{len(found)} {found.modality} examples, labels: {', '.join(found.labels)}")
    head = _with_progress(
        lambda **callbacks: ctx.obj.create_head(
            name,
            found,
            backbone=backbone,
            fine_tune=fine_tune,
            unknown_keep=unknown_keep,
            **callbacks,
        ),
    )
    _summary(head)


@heads.command("list")
def heads_list(ctx: typer.Context) -> None:
    table = Table("id", "name", "backbone", "status", "version", "examples", "accuracy")
    for head in ctx.obj.heads():
        metrics = head.metrics
        accuracy = metrics.cv_accuracy if metrics else None
        table.add_row(
            head.id,
            head.name,
            head.backbone,
            head.status,
            str(head.version),
            str(metrics.n_examples) if metrics else "",
            "" if accuracy is None else f"{accuracy:.3f}",
        )
    out.print(table)


@heads.command("show")
def heads_show(ctx: typer.Context, head_id: str) -> None:
    """A head's metrics: per-label precision and recall, and the confusion matrix."""
    head = ctx.obj.head(head_id)
    _summary(head)
    if head.status != "ready":
        out.print(f"status: {head.status}" + (f" ({head.error})" if head.error else ""))
    metrics = head.metrics
    if metrics is None:
        return
    if metrics.cv_per_label:
        table = Table("label", "examples", "precision", "recall", title="held out, per label")
        for label in head.labels:
            row = metrics.cv_per_label[label]
            table.add_row(label, str(row.support), f"{row.precision:.3f}", f"{row.recall:.3f}")
        out.print(table)
    if metrics.cv_confusion_matrix:
        table = Table("true \\ predicted", *head.labels, title="held-out confusion matrix")
        for label, row in zip(head.labels, metrics.cv_confusion_matrix, strict=True):
            table.add_row(label, *(str(count) for count in row))
        out.print(table)


@heads.command("delete")
def heads_delete(ctx: typer.Context, head_id: str) -> None:
    ctx.obj.delete_head(head_id)
    out.print(f"deleted {head_id}")


@examples.command("add")
def examples_add(
    ctx: typer.Context,
    head_id: str,
    from_dir: Annotated[Path, typer.Option("--from", help="one folder per label")],
) -> None:
    """Add examples from a folder per label; the head retrains on all of them."""
    found = Examples.from_dir(from_dir)
    head = _with_progress(
        lambda **callbacks: ctx.obj.add_examples(head_id, found, **callbacks),
    )
    _summary(head)


# Predict and export ------------------------------------------------------------------------


@app.command()
def predict(
    ctx: typer.Context,
    head_id: str,
    files: Annotated[
        list[Path] | None, typer.Argument(help="image files, or audio clips (.wav, ...)")
    ] = None,
    text: Annotated[list[str] | None, typer.Option("--text", help="a text (repeatable)")] = None,
    top_k: Annotated[int, typer.Option(help="labels ranked per input")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="the API's answer as JSON")] = False,
) -> None:
    """Predict image files or audio clips, or texts given with --text."""
    if bool(files) == bool(text):
        raise typer.BadParameter("give image or audio files, or --text, one of them")
    clips = [f for f in files or () if f.suffix.lower() in AUDIO_SUFFIXES]
    if clips and len(clips) != len(files or ()):
        raise typer.BadParameter("give image files or audio clips, not both")
    images = [] if clips else files or []
    answer = ctx.obj.predict(head_id, images=images, texts=text or (), clips=clips, top_k=top_k)
    if as_json:
        print(answer.model_dump_json(indent=2))
        return
    table = Table("input", "label", "score", "unknown", *(["top k"] if top_k > 1 else []))
    sources: list[Path] | list[str] = files or text or []
    for source, row in zip(sources, answer.predictions, strict=True):
        ranked = ", ".join(f"{s.label} {s.score:.3f}" for s in row.top_k)
        table.add_row(
            str(source),
            row.label or "",
            f"{row.score:.3f}",
            "yes" if row.unknown else "",
            *([ranked] if top_k > 1 else []),
        )
    out.print(table)


@app.command()
def export(
    ctx: typer.Context,
    head_id: str,
    output: Annotated[Path, typer.Option("-o", "--output", help="where to write the model")],
    variant: Annotated[str | None, typer.Option(help="fp32 or int8")] = None,
) -> None:
    """Download backbone + head as one ONNX model."""
    model = ctx.obj.export(head_id, output, variant=variant)
    out.print(f"wrote {output} ({len(model) / 1e6:.1f} MB)")
