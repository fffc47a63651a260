"""``vlsi-train`` and ``vlsi-verbalize``: argv -> config (defaults < --config file < options) -> recipe.

Options, defaults and help are generated from the config dataclasses (:mod:`vlsi.train.config`); heavy imports
happen inside the commands, so ``--help`` is instant.
"""

from __future__ import annotations

import json

import click

from vlsi.common.cli import CONTEXT, config_options, user_errors

from .config import TrainConfig, VerbalizeConfig


@click.command(context_settings=CONTEXT)
@user_errors
@config_options(TrainConfig, config_file=True)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
def main(cfg: TrainConfig, as_json: bool):
    """Train a student VLM from a teacher cache: verbalize -> interact (adaptive layer matching) -> sft."""
    from .recipe import run

    summary = run(cfg)
    if as_json:
        click.echo(json.dumps(summary, sort_keys=True, default=str))
        return
    state = "done" if summary.get("finished") else "stopped (resume with --resume)"
    click.echo(f"{state}: {summary['out']}" + (f" -> {summary['final']}" if summary.get("final") else ""))
    if summary.get("skipped"):
        click.echo(f"skipped {summary['skipped']} bad sample(s): {summary['out']}/bad_samples.jsonl")


@click.command(context_settings=CONTEXT)
@user_errors
@config_options(VerbalizeConfig, config_file=True)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
def verbalize(cfg: VerbalizeConfig, as_json: bool):
    """Train per-layer verbalizers (verb-FFN + the model's frozen norm and head) with the backbone frozen."""
    from .recipe import run_verbalize

    summary = run_verbalize(cfg)
    if as_json:
        click.echo(json.dumps(summary, sort_keys=True, default=str))
        return
    state = "done" if summary["finished"] else f"stopped at step {summary['step']}/{summary['total_steps']}"
    click.echo(f"{state}: {summary['out']} ({summary.get('tokens_per_s', 0):.0f} tokens/s)")
    if summary.get("bad_sample_report"):
        click.echo(f"skipped {summary['skipped']} bad sample(s): {summary['bad_sample_report']}")


if __name__ == "__main__":
    main()
