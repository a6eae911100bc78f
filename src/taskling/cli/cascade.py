"""`cascade`: put cheap stages in front of a run's specialist, calibrated on its validation rows."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from taskling.cli.bar import curve_table
from taskling.cli.common import app, console, friendly_errors, progress_bar


@app.command()
@friendly_errors
def cascade(
    run_dir: Annotated[Path, typer.Argument(help="A trained classification run directory.")],
    stages: Annotated[
        str,
        typer.Option(help="Stages in order, cheapest first: tfidf, minilm, lora, then optionally teacher or unknown."),
    ] = "tfidf,minilm,lora",
    max_loss: Annotated[
        float, typer.Option(help="Accuracy the cascade may lose against its last model stage, on validation rows.")
    ] = 0.005,
    category_margin: Annotated[
        float, typer.Option(help="Accuracy any one category may lose against the last model stage (the gate's rule).")
    ] = 0.10,
    metric: Annotated[str, typer.Option(help="Confidence: probability (top) or margin (top minus runner-up).")] = (
        "probability"
    ),
    calibration: Annotated[str, typer.Option(help="isotonic, temperature or none.")] = "isotonic",
    oos: Annotated[
        Path | None, typer.Option("--oos", help="Out-of-scope rows (labels outside the set) for the `unknown` stage.")
    ] = None,
    calibrate: Annotated[
        Path | None,
        typer.Option("--calibrate", help="More labelled rows (never trained on) to calibrate on, besides validation."),
    ] = None,
    teacher_url: Annotated[str | None, typer.Option(help="The teacher stage's OpenAI-compatible base URL.")] = None,
    teacher_model: Annotated[str | None, typer.Option(help="The teacher's model name.")] = None,
    teacher_cost: Annotated[float, typer.Option(help="The teacher's $ per call.")] = 0.0,
    hardware_per_hour: Annotated[float, typer.Option(help="Local hardware $ per hour (prices local stages).")] = 0.10,
    batch_size: Annotated[int, typer.Option(help="Messages per batch inside each stage.")] = 32,
) -> None:
    """Build RUN_DIR/cascade.json: each message goes to the cheapest stage that is sure.

    Cheap stages are fitted on the run's training rows; each stage's confidence is calibrated
    on its validation rows and the thresholds are chosen to keep accuracy within --max-loss of
    the last model stage, and every category within --category-margin, while sending the
    fewest messages to the expensive ones. `classify`, `eval`, `predict-batch` and `serve`
    then use the cascade (`--no-cascade` to skip it).
    """
    from taskling.evaluate.cascade import build_cascade
    from taskling.evaluate.cost import cascade_curve

    settings = None
    if teacher_url or teacher_model:
        settings = {"url": teacher_url, "model": teacher_model, "cost_per_call": teacher_cost}
    with progress_bar("cascade", "stages") as update:
        spec = build_cascade(
            run_dir,
            stages.split(","),
            max_loss=max_loss,
            category_margin=category_margin,
            metric=metric,
            calibration=calibration,
            teacher_settings=settings,
            oos_file=oos,
            calibration_file=calibrate,
            batch_size=batch_size,
            hardware_per_hour=hardware_per_hour,
            progress=update,
        )
    curve = cascade_curve(run_dir)
    if curve is not None:
        console.print(curve_table(curve))
    v = spec.validation
    console.print(
        Text(
            f"chosen: {v['cascade_accuracy']:.2%} on {v['n']} validation rows vs {v['reference_stage']} alone "
            f"{v['reference_accuracy']:.2%} (max loss {max_loss:.2%}); wrote {run_dir / 'cascade.json'}"
        )
    )
