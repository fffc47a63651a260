"""``vlsi-verbalize``: train the verbalizers of a frozen model (VLsI step 1). Thin: argv -> config -> run."""

from __future__ import annotations

import json
import sys

import click


def _layers(_ctx, _param, value):
    if value is None:
        return None
    try:
        layers = sorted({int(x) for x in value.split(",") if x.strip()})
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not layers:
        raise click.BadParameter("no layers given")
    return layers


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--model", required=True, help="Local model dir, preset (e.g. qwen2-vl-7b) or cached hub id.")
@click.option("--data", required=True, help="LLaVA-style .json/.jsonl or .parquet dataset.")
@click.option("--image-root", default=None, help="Folder image paths resolve against (default: the data file's).")
@click.option("--layers", callback=_layers, default=None, help="Target layers, e.g. 2,6,10 (default: the preset's).")
@click.option("--out", required=True, help="Output dir (verbalizers.safetensors + .json, log.jsonl, checkpoints/).")
@click.option("--kind", type=click.Choice(["verb-ffn", "mlp", "ffn", "decoder"]), default="verb-ffn")
@click.option("--steps", type=int, default=None, help="Optimizer steps (default: 1 epoch).")
@click.option("--epochs", type=float, default=None, help="Epochs (instead of --steps).")
@click.option("--batch-size", type=int, default=4)
@click.option("--grad-accum", type=int, default=1)
@click.option("--lr", type=float, default=1e-4)
@click.option("--min-lr", type=float, default=1e-6, help="Cosine schedule floor.")
@click.option("--warmup-steps", type=int, default=0)
@click.option("--weight-decay", type=float, default=0.0)
@click.option("--seed", type=int, default=0)
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoints/latest (exact: weights, optimizer, RNG, data).")
@click.option("--max-length", type=int, default=None, help="Samples longer than this (tokens, images expanded) are bad.")
@click.option("--on-bad-sample", type=click.Choice(["error", "skip"]), default="error",
              help="error: stop naming the sample; skip: continue and write OUT/bad_samples.jsonl.")
@click.option("--save-every", type=int, default=100, help="Checkpoint every N steps (and at the end).")
@click.option("--stop-after", type=int, default=None, help="Stop with a checkpoint after N steps of this run.")
@click.option("--device", default=None, help="cpu / cuda / cuda:1 (default: cuda if available).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def main(as_json: bool, no_progress: bool, **kw):
    """Train per-layer verbalizers (verb-FFN + the model's frozen norm and head) with the backbone frozen."""
    from vlsi.models.errors import VlsiError

    try:
        from vlsi.models.verbalize import VerbalizeConfig, run

        cfg = VerbalizeConfig(**kw, progress=not no_progress)
        summary = run(cfg)
    except VlsiError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    if as_json:
        click.echo(json.dumps(summary, sort_keys=True))
    else:
        state = "done" if summary["finished"] else f"stopped at step {summary['step']}/{summary['total_steps']}"
        click.echo(f"{state}: {summary['out']} ({summary['tokens_per_s']:.0f} tokens/s)")
        if summary.get("bad_sample_report"):
            click.echo(f"skipped {summary['skipped']} bad sample(s): {summary['bad_sample_report']}")


if __name__ == "__main__":
    main()
