"""``vlsi-eval``: accuracy of a model on a dataset (default command), per-layer answers, layer-matching plots.

    vlsi-eval --model DIR --data D [--image-root R] [--out results.json] [--max-new-tokens N] [--batch-size B]
    vlsi-eval layers --model DIR --verbalizers VDIR --data D --sample ID [--compare DIR2 --compare-verbalizers VDIR2]
    vlsi-eval matching --run ODIR

The group runs the ``run`` subcommand when its first argument is not a subcommand name, so ``vlsi-eval --model ...``
and ``vlsi-eval run --model ...`` are the same. Heavy imports live inside the commands: ``--help`` is instant.
Errors: one line ``error: <message>`` on stderr, exit status 2.
"""

from __future__ import annotations

import functools
import json
import sys

import click

DEFAULT_COMMAND = "run"


class DefaultGroup(click.Group):
    """A group that forwards to ``DEFAULT_COMMAND`` when the first argument is not one of its subcommands.

    ``vlsi-eval`` (no arguments), ``vlsi-eval --help`` and ``vlsi-eval <subcommand> ...`` behave as usual.
    """

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = [DEFAULT_COMMAND, *args]
        return super().parse_args(ctx, args)


def _errors(fn):
    """User errors (vlsi / cache errors, missing files) -> ``error: <one line>``, exit 2, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - re-raised below unless it is a user error
            if not _is_user_error(e):
                raise
            click.echo(f"error: {' '.join(str(e).split())}", err=True)
            sys.exit(2)

    return wrapper


def _is_user_error(e: BaseException) -> bool:
    from vlsi.models.errors import VlsiError

    if isinstance(e, (VlsiError, FileNotFoundError)):
        return True
    cf = sys.modules.get("vlsi.cache_format.errors")  # loaded iff a cache was touched; no import just to check
    return cf is not None and isinstance(e, cf.CacheError)


def _emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, ensure_ascii=False, default=str))


def _write_json(path, obj) -> None:
    from pathlib import Path

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")
    tmp.replace(p)


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Evaluate a vlsi model: accuracy (default command `run`), per-layer answers (`layers`), matching plots
    (`matching`). `vlsi-eval --model DIR --data D` runs `run`."""


_device = click.option("--device", default=None, help="torch device (default: cuda if available, else cpu).")
_device_map = click.option("--device-map", type=click.Choice(["auto"]), default=None,
                           help="Spread a big model over all GPUs (accelerate); --device is then ignored.")


@main.command("run")
@click.option("--model", "model", required=True, help="Model directory (e.g. ODIR/final), preset or cached hub id.")
@click.option("--data", "data", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Eval data: LLaVA .json/.jsonl/.parquet, or MMBench-style .tsv.")
@click.option("--image-root", type=click.Path(exists=True, file_okay=False), default=None,
              help="Folder relative image paths resolve against (default: the data file's folder).")
@click.option("--out", "out", type=click.Path(dir_okay=False), default=None, help="Write the results JSON here.")
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--max-length", default=None, type=click.IntRange(min=1), help="Longest prompt (tokens, after images).")
@click.option("--limit", default=None, type=click.IntRange(min=1), help="Evaluate only the first N samples.")
@click.option("--on-bad-sample", type=click.Choice(["error", "skip"]), default="error", show_default=True)
@_device
@_device_map
@click.option("--json", "as_json", is_flag=True, help="Print the results JSON on stdout instead of the table.")
@click.option("--predictions/--no-predictions", default=True, show_default=True,
              help="Keep per-sample predictions in the JSON.")
@_errors
def run_command(model, data, image_root, out, max_new_tokens, batch_size, max_length, limit, on_bad_sample, device,
                device_map, as_json, predictions):
    """Greedy generation on DATA, scored (MC letter / normalised exact match), accuracy per category."""
    from vlsi.eval.run import format_table, run_eval

    res = run_eval(model, data, image_root=image_root, batch_size=batch_size, max_new_tokens=max_new_tokens,
                   max_length=max_length, limit=limit, on_bad_sample=on_bad_sample, device=device,
                   device_map=device_map, progress=not as_json)
    if not predictions:
        res.pop("predictions")
    if out:
        _write_json(out, res)
    if as_json:
        _emit_json(res)
    else:
        click.echo(format_table(res))
        if out:
            click.echo(f"results: {out}")


def _find_sample(data, image_root, sample_id):
    from vlsi.eval.run import load_eval_samples
    from vlsi.models.errors import VlsiError

    for s in load_eval_samples(data, image_root=image_root):
        if s.id == str(sample_id):
            return s
    raise VlsiError(f"{data}: no sample with id {sample_id!r}")


def _view(model, verbalizers, sample, *, device, device_map, max_new_tokens):
    from vlsi.eval.layers import layer_answers
    from vlsi.models.adapter import load_model
    from vlsi.models.verbalizers import load_verbalizers

    adapter = load_model(model, device=device, device_map=device_map)
    vs = load_verbalizers(verbalizers, adapter=adapter)
    answers = layer_answers(adapter, vs, sample, max_new_tokens=max_new_tokens)
    return {"model": str(model), "verbalizers": str(verbalizers),
            "answers": [{"layer": a.layer, "text": a.text, "token_ids": a.token_ids, "stopped": a.stopped}
                        for a in answers]}


@main.command("layers")
@click.option("--model", required=True, help="Model directory, preset or cached hub id.")
@click.option("--verbalizers", "verbalizers", required=True, type=click.Path(exists=True, file_okay=False),
              help="The model's verbalizer directory (vlsi-verbalize --out).")
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--sample", "sample_id", required=True, help="Id of the sample to show.")
@click.option("--image-root", type=click.Path(exists=True, file_okay=False), default=None)
@click.option("--compare", default=None, help="A second model to show side by side (e.g. the teacher).")
@click.option("--compare-verbalizers", type=click.Path(exists=True, file_okay=False), default=None)
@click.option("--max-new-tokens", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write the answers as JSON here.")
@click.option("--png", type=click.Path(dir_okay=False), default=None, help="Write the table as a PNG here.")
@_device
@_device_map
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout instead of the table.")
@_errors
def layers_command(model, verbalizers, data, sample_id, image_root, compare, compare_verbalizers, max_new_tokens,
                   out, png, device, device_map, as_json):
    """Each target layer's greedy answer through its verbalizer (VLsI Figure 3), side by side for two models."""
    from vlsi.eval.layer_view import format_layer_table, plot_layer_table
    from vlsi.eval.scoring import gold_answer
    from vlsi.models.errors import VlsiError

    if (compare is None) != (compare_verbalizers is None):
        raise VlsiError("--compare and --compare-verbalizers go together")
    sample = _find_sample(data, image_root, sample_id)
    last_user = [t.text for t in sample.turns if t.role == "user"][-1]
    result = {"sample_id": sample.id, "question": last_user.replace("<image>\n", "").replace("<image>", ""),
              "gold": gold_answer(sample), "views": []}
    result["views"].append(_view(model, verbalizers, sample, device=device, device_map=device_map,
                                 max_new_tokens=max_new_tokens))
    if compare:
        result["views"].append(_view(compare, compare_verbalizers, sample, device=device, device_map=device_map,
                                     max_new_tokens=max_new_tokens))
    if out:
        _write_json(out, result)
    if png:
        plot_layer_table(result, png)
    if as_json:
        _emit_json(result)
    else:
        click.echo(format_layer_table(result))
        for what, p in (("json", out), ("png", png)):
            if p:
                click.echo(f"{what}: {p}")


@main.command("matching")
@click.option("--run", "run_dir", required=True, type=click.Path(exists=True),
              help="Training output folder holding metrics.jsonl (or the metrics file itself).")
@click.option("--out-dir", type=click.Path(file_okay=False), default=None,
              help="Where to write the PNGs (default: the run folder).")
@click.option("--window", default=0.2, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Fraction of the interaction steps in each of the start / end windows.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@_errors
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
