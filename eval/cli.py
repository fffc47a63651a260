"""``vlsi-eval``: accuracy of a model on a dataset (default command), per-layer answers, layer-matching plots.

    vlsi-eval --model DIR --data D [--image-root R] [--out results.json] [--max-new-tokens N] [--batch-size B]
    vlsi-eval layers --model DIR --verbalizers VDIR --data D --sample ID [--compare DIR2 --compare-verbalizers VDIR2]
    vlsi-eval matching --run ODIR

The group runs the ``run`` subcommand when its first argument is not a subcommand name, so ``vlsi-eval --model ...``
and ``vlsi-eval run --model ...`` are the same. Heavy imports live inside the commands: ``--help`` is instant.
Errors: one line ``error: <message>`` on stderr, exit status 2.
"""

from __future__ import annotations

import json

import click

from vlsi.common.cli import CONTEXT, config_options, user_errors
from vlsi.common.errors import VlsiError
from vlsi.eval.config import EvalConfig, LayersConfig

DEFAULT_COMMAND = "run"


class DefaultGroup(click.Group):
    """A group that forwards to ``DEFAULT_COMMAND`` when the first argument is not one of its subcommands.

    ``vlsi-eval`` (no arguments), ``vlsi-eval --help`` and ``vlsi-eval <subcommand> ...`` behave as usual.
    """

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = [DEFAULT_COMMAND, *args]
        return super().parse_args(ctx, args)


def _emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, ensure_ascii=False, default=str))


def _write_json(path, obj) -> None:
    from pathlib import Path

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")
    tmp.replace(p)


@click.group(cls=DefaultGroup, context_settings=CONTEXT)
def main():
    """Evaluate a vlsi model: accuracy (default command `run`), per-layer answers (`layers`), matching plots
    (`matching`). `vlsi-eval --model DIR --data D` runs `run`."""


@main.command("run")
@user_errors
@config_options(EvalConfig)
@click.option("--json", "as_json", is_flag=True, help="Print the results JSON on stdout instead of the table.")
def run_command(cfg: EvalConfig, as_json: bool):
    """Greedy generation on DATA, scored (MC letter / normalised exact match), accuracy per category."""
    from vlsi.eval.run import format_table, run_eval
    from vlsi.models.adapter import torch_dtype

    res = run_eval(cfg.model, cfg.data, image_root=cfg.image_root, batch_size=cfg.batch_size,
                   max_new_tokens=cfg.max_new_tokens, max_length=cfg.max_length, limit=cfg.limit,
                   on_bad_sample=cfg.on_bad_sample, device=cfg.device, dtype=torch_dtype(cfg.dtype),
                   device_map=cfg.device_map, progress=not as_json)
    if not cfg.predictions:
        res.pop("predictions")
    if cfg.out:
        _write_json(cfg.out, res)
    if as_json:
        _emit_json(res)
    else:
        click.echo(format_table(res))
        if cfg.out:
            click.echo(f"results: {cfg.out}")


def _find_sample(cfg: LayersConfig):
    from vlsi.eval.run import load_eval_samples
    from vlsi.models.data import BadSamplePolicy

    for s in load_eval_samples(cfg.data, image_root=cfg.image_root, policy=BadSamplePolicy(cfg.on_bad_sample)):
        if s.id == cfg.sample:
            return s
    raise VlsiError(f"{cfg.data}: no sample with id {cfg.sample!r}")


def _view(cfg: LayersConfig, model, verbalizers, sample):
    from vlsi.eval.layers import layer_answers
    from vlsi.models.adapter import load_model, torch_dtype
    from vlsi.models.verbalizers import load_verbalizers

    adapter = load_model(model, device=cfg.device, dtype=torch_dtype(cfg.dtype), device_map=cfg.device_map)
    vs = load_verbalizers(verbalizers, adapter=adapter)
    answers = layer_answers(adapter, vs, sample, max_new_tokens=cfg.max_new_tokens, max_length=cfg.max_length)
    return {"model": str(model), "verbalizers": str(verbalizers),
            "answers": [{"layer": a.layer, "text": a.text, "token_ids": a.token_ids, "stopped": a.stopped}
                        for a in answers]}


@main.command("layers")
@user_errors
@config_options(LayersConfig)
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout instead of the table.")
def layers_command(cfg: LayersConfig, as_json: bool):
    """Each target layer's greedy answer through its verbalizer (VLsI Figure 3), side by side for two models."""
    from vlsi.eval.layer_view import format_layer_table, plot_layer_table
    from vlsi.eval.scoring import gold_answer

    sample = _find_sample(cfg)
    last_user = [t.text for t in sample.turns if t.role == "user"][-1]
    result = {"sample_id": sample.id, "question": last_user.replace("<image>\n", "").replace("<image>", ""),
              "gold": gold_answer(sample), "views": [_view(cfg, cfg.model, cfg.verbalizers, sample)]}
    if cfg.compare:
        result["views"].append(_view(cfg, cfg.compare, cfg.compare_verbalizers, sample))
    if cfg.out:
        _write_json(cfg.out, result)
    if cfg.png:
        plot_layer_table(result, cfg.png)
    if as_json:
        _emit_json(result)
    else:
        click.echo(format_layer_table(result))
        for what, p in (("json", cfg.out), ("png", cfg.png)):
            if p:
                click.echo(f"{what}: {p}")


@main.command("matching")
@user_errors
@click.option("--run", "run_dir", required=True, type=click.Path(exists=True),
              help="Training output folder holding metrics.jsonl (or the metrics file itself).")
@click.option("--out-dir", type=click.Path(file_okay=False), default=None,
              help="Where to write the PNGs (default: the run folder).")
@click.option("--window", default=0.2, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Fraction of the interaction steps in each of the start / end windows.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def matching_command(run_dir, out_dir, window, as_json):
    """Heatmap of matched teacher layer per student layer, start vs end of interaction (VLsI Figure 5), and
    per-layer KL curves."""
    from vlsi.eval.matching import matching_report

    rep = matching_report(run_dir, out_dir, window=window)
    if as_json:
        _emit_json(rep)
        return
    c = rep["counts"]
    click.echo(f"{c['n_steps']} interaction steps; {c['n_student']} student x {c['n_teacher']} teacher target layers")
    for key in ("start", "end"):
        a, b = c[f"{key}_steps"]
        modal = [rep["teacher_layers"][max(range(c["n_teacher"]), key=row.__getitem__)] for row in c[key]]
        click.echo(f"{key:>5} (steps {a}-{b}): most frequent match per student layer "
                   + ", ".join(f"{s}->{t}" for s, t in zip(rep["student_layers"], modal)))
    click.echo(f"heatmap: {rep['heatmap']}")
    if rep["kl_curves"]:
        click.echo(f"kl curves: {rep['kl_curves']}")


if __name__ == "__main__":
    main()
