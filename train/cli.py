"""``vlsi-train``: argv -> TrainConfig (defaults < --config file < options) -> ``vlsi.train.loop.run``.

Every option defaults to ``None`` here ("not given"), so a config file's value is only overridden by options the
user actually passed; the real defaults live in ``vlsi.train.config.TrainConfig``. Heavy imports happen inside the
command, so ``--help`` is instant.
"""

from __future__ import annotations

import json
import sys

import click

from .names import ADAPTIVE_TEMPS, LOSS_OPS, MATCH_RULES, STAGES


def _csv_ints(_ctx, _param, value):
    if value is None:
        return None
    try:
        return tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


def _kv(_ctx, _param, values):
    if not values:
        return None
    out = {}
    for v in values:
        if "=" not in v:
            raise click.BadParameter(f"expected key=value, got {v!r}")
        k, _, val = v.partition("=")
        out[k] = val
    return out


def _opt(*names, **kw):
    kw.setdefault("default", None)
    return click.option(*names, **kw)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@_opt("--config", "config_file", type=click.Path(dir_okay=False), help="YAML/TOML file of options (keys = option names).")
@_opt("--cache", help="Teacher cache URL (local path or fsspec URL) written by vlsi-extract.")
@_opt("--student", help="Student model: local HF dir, preset name or cached hub id.")
@_opt("--data", help="Dataset (LLaVA .json/.jsonl or .parquet) the cache was extracted from.")
@_opt("--image-root", help="Folder image paths resolve against (default: the data file's folder).")
@_opt("--out", help="Output dir: config.yaml, metrics.jsonl, checkpoints/, verbalizers/, final/.")
@_opt("--storage-option", "storage_options", multiple=True, callback=_kv, help="fsspec option key=value (repeatable).")
@_opt("--stages", help=f"Comma-separated subset of {','.join(STAGES)} [default: all].")
@_opt("--steps", type=int, help="Optimizer steps per stage (instead of --epochs).")
@_opt("--epochs", type=float, help="Epochs per stage [default: 1].")
@_opt("--verbalize-steps", type=int, help="Steps of the verbalize stage (overrides --steps).")
@_opt("--interact-steps", type=int, help="Steps of the interact stage (overrides --steps).")
@_opt("--sft-steps", type=int, help="Steps of the sft stage (overrides --steps).")
@_opt("--batch-size", type=int, help="Samples per micro-batch [default: 4].")
@_opt("--grad-accum", type=int, help="Micro-batches per optimizer step [default: 1].")
@_opt("--lr", type=float, help="Peak learning rate of each stage's cosine schedule [default: 1e-4].")
@_opt("--min-lr", type=float, help="Final learning rate [default: 1e-6].")
@_opt("--warmup-steps", type=int, help="Linear warm-up steps per stage [default: 0].")
@_opt("--weight-decay", type=float, help="AdamW weight decay [default: 0].")
@_opt("--max-grad-norm", type=float, help="Gradient clipping norm [default: 1.0].")
@_opt("--lora-rank", type=int, help="LoRA rank (= alpha unless --lora-alpha) [default: 64].")
@_opt("--lora-alpha", type=float, help="LoRA alpha [default: = rank].")
@_opt("--lora-dropout", type=float, help="LoRA dropout [default: 0].")
@_opt("--full", is_flag=True, help="Train all LLM weights instead of LoRA.")
@_opt("--train-all", is_flag=True, help="Train every parameter (vision, embeddings, head too): models from scratch.")
@_opt("--seed", type=int, help="Seed [default: 0].")
@_opt("--resume", is_flag=True, help="Continue from ODIR/checkpoints (exact).")
@_opt("--student-verbalizers", help="Trained student verbalizers (VDIR) instead of the verbalize stage.")
@_opt("--student-layers", callback=_csv_ints, help="Student target layers for the verbalize stage, e.g. 2,6,10.")
@_opt("--verbalizer-kind", type=click.Choice(["verb-ffn", "mlp", "ffn", "decoder"]), help="[default: verb-ffn]")
@_opt("--train-verbalizers/--freeze-verbalizers", help="Train the student verbalizers during interact [default: frozen].")
@_opt("--match", type=click.Choice(MATCH_RULES),
      help="Layer matching rule [default: multinomial].")
@_opt("--match-range/--no-match-range", help="Candidates start .. tl - ts + i [default: on].")
@_opt("--match-order/--no-match-order", help="Order preservation [default: on].")
@_opt("--adaptive-temp", type=click.Choice(ADAPTIVE_TEMPS),
      help="Matching temperature [default: scale-over-range].")
@_opt("--match-scale", type=float, help="Adaptive temperature scale [default: 2].")
@_opt("--match-k", type=int, help="k of --match bottom-k [default: 2].")
@_opt("--il-loss", type=click.Choice(LOSS_OPS), help="Intermediate-layer loss [default: kld].")
@_opt("--ll-loss", type=click.Choice(LOSS_OPS), help="Last-layer loss [default: kld].")
@_opt("--kl-direction", type=click.Choice(["forward", "reverse"]), help="KL(teacher||student) = forward [default].")
@_opt("--temperature", type=float, help="KL temperature [default: 1].")
@_opt("--max-length", type=int, help="Longest encoded sample (tokens); longer ones are bad samples.")
@_opt("--on-bad-sample", type=click.Choice(["error", "skip"]), help="[default: error]")
@_opt("--verify-join", type=click.Choice(["full", "lazy"]), help="Check every sample before training [default: full].")
@_opt("--num-workers", type=int, help="DataLoader workers reading the cache [default: 0].")
@_opt("--prefetch", type=int, help="Micro-batches each worker reads ahead [default: 4].")
@_opt("--chunk-tokens", type=int, help="Answer rows per logits tile [default: 1024].")
@_opt("--grad-checkpointing/--no-grad-checkpointing", help="Recompute activations in backward [default: off].")
@_opt("--device", help="cpu / cuda / cuda:1 [default: cuda if available].")
@_opt("--dtype", type=click.Choice(["bfloat16", "float32", "float16"]), help="[default: bf16 on GPU, fp32 on CPU]")
@_opt("--save-every", type=int, help="Checkpoint every N steps (0: at stage ends) [default: 0].")
@_opt("--stop-after", type=int, help="Stop with a checkpoint after N steps of this run.")
@_opt("--keep-checkpoints", type=int, help="Checkpoints kept [default: 2].")
@_opt("--tensorboard/--no-tensorboard", help="Also write TensorBoard scalars to ODIR/tb.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def main(config_file, as_json: bool, no_progress: bool, **kw):
    """Train a student VLM from a teacher cache: verbalize -> interact (adaptive layer matching) -> sft."""
    from vlsi.cache_format import CacheError
    from vlsi.models.errors import VlsiError

    # Flags without a negative form: "not given" must stay None so a config file's value survives.
    for flag in ("full", "train_all", "resume"):
        if kw.get(flag) is False:
            kw[flag] = None
    if no_progress:
        kw["progress"] = False
    try:
        from .config import build_config
        from .loop import run

        cfg = build_config(config_file, **kw)
        summary = run(cfg)
    except (VlsiError, CacheError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    if as_json:
        click.echo(json.dumps(summary, sort_keys=True, default=str))
    else:
        state = "done" if summary.get("finished") else "stopped (resume with --resume)"
        click.echo(f"{state}: {summary['out']}" + (f" -> {summary['final']}" if summary.get("final") else ""))
        if summary.get("skipped"):
            click.echo(f"skipped {summary['skipped']} bad sample(s): {summary['out']}/bad_samples.jsonl")


if __name__ == "__main__":
    main()
