"""``vlsi-train`` and ``vlsi-verbalize``: argv -> config (defaults < --config file < options) -> recipe.

Options, defaults and help are generated from the config dataclasses (:mod:`vlsi.train.config`); heavy imports
happen inside the commands, so ``--help`` is instant.
"""

from __future__ import annotations

import json
import os

import click

from vlsi.common.cli import CONTEXT, config_options, user_errors

from .config import TrainConfig, VerbalizeConfig


def _command(cls, recipe: str, doc: str, lines):
    """A command over ``cls`` that runs ``vlsi.train.recipe.<recipe>`` and prints ``lines(summary)`` (or --json)."""

    @click.command(context_settings=CONTEXT, help=doc)
    @user_errors
    @config_options(cls, config_file=True)
    @click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
    def command(cfg, as_json: bool):
        from . import recipe as recipes

        summary = getattr(recipes, recipe)(cfg)
        if int(os.environ.get("RANK", "0")) != 0:  # under torchrun one summary, rank 0's
            return
        if as_json:
            click.echo(json.dumps(summary, sort_keys=True, default=str))
            return
        for line in lines(summary):
            click.echo(line)
        if summary.get("skipped"):
            click.echo(f"skipped {summary['skipped']} bad sample(s): {summary['out']}/bad_samples.jsonl")

    return command


def _train_lines(s: dict):
    state = "done" if s.get("finished") else "stopped (resume with --resume)"
    yield f"{state}: {s['out']}" + (f" -> {s['final']}" if s.get("final") else "")


def _verbalize_lines(s: dict):
    state = "done" if s["finished"] else f"stopped at step {s['step']}/{s['total_steps']}"
    yield f"{state}: {s['out']} ({s.get('tokens_per_s', 0):.0f} tokens/s)"


main = _command(TrainConfig, "run", "Train a student VLM from a teacher cache: verbalize -> interact (adaptive layer "
                "matching) -> sft; or, with --method genrecal (a student with another tokenizer), recalibrate -> "
                "joint -> sft.", _train_lines)
verbalize = _command(VerbalizeConfig, "run_verbalize", "Train per-layer verbalizers (verb-FFN + the model's frozen "
                     "norm and head) with the backbone frozen.", _verbalize_lines)

if __name__ == "__main__":
    main()
