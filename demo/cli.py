"""`vlsi-demo`: the whole pipeline on the embedded default (see vlsi.demo.pipeline)."""

from __future__ import annotations

import json

import click

from vlsi.common.cli import CONTEXT, user_errors


@click.command(context_settings=CONTEXT)
@user_errors
@click.option("--out", default="runs/demo", show_default=True, help="Output folder.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--quick", is_flag=True, help="A tiny budget (about two minutes): every stage runs, numbers mean nothing.")
@click.option("--student-steps", type=int, default=None, help="Optimizer steps of each student (same for both).")
@click.option("--teacher-steps", type=int, default=None, help="SFT steps of the teacher from scratch.")
@click.option("--eval-limit", type=int, default=None, help="Evaluate only the first N test samples.")
@click.option("--genrecal", is_flag=True, help="Also train a student with ANOTHER tokenizer from the same teacher: "
              "GenRecal vs SFT only of that student, same start and budget (vlsi.demo.genrecal_arm).")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
def main(out, seed, quick, student_steps, teacher_steps, eval_limit, genrecal, no_progress, as_json):
    """Make tiny models and VQA data, SFT a teacher, verbalize it, extract its cache, then train two students with
    the same budget (SFT only vs VLsI) and print their test accuracy side by side."""
    from vlsi.demo.pipeline import DemoConfig, format_summary, run_demo

    kw = {k: v for k, v in dict(out=out, seed=seed, student_steps=student_steps, teacher_steps=teacher_steps,
                                 eval_limit=eval_limit, progress=not no_progress,
                                 genrecal=genrecal or None).items() if v is not None}
    cfg = DemoConfig.quick(**kw) if quick else DemoConfig(**kw)
    summary = run_demo(cfg)
    click.echo(json.dumps(summary, indent=2, default=str) if as_json else format_summary(summary))


if __name__ == "__main__":
    main()
