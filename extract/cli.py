"""``vlsi-extract``: argv -> ExtractConfig (options generated from its fields) -> run_extract -> summary.

Heavy imports stay inside the command: ``--help`` imports no torch."""

from __future__ import annotations

import json

import click

from vlsi.common.cli import CONTEXT, config_options, user_errors
from vlsi.extract.config import ExtractConfig


@click.command(context_settings=CONTEXT)
@user_errors
@config_options(ExtractConfig)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
def main(cfg: ExtractConfig, as_json: bool):
    """Run the teacher once over DATA and write its per-layer verbalized top-k log-probs into CACHE.

    For every answer position (row t predicts token t+1) and each verbalizer layer plus the final head: the top-k
    token ids, their log-probs under the full softmax over the real vocabulary, and the tail log-mass.

    --hidden-states answer|all also stores the teacher's final post-norm hidden states (bf16) at the answer rows
    (and the question rows): the features of vlsi-train --method genrecal. --verbalizers is then optional (without
    it the cache holds the final head's top-k only).
    """
    from vlsi.extract.run import run_extract

    summary = run_extract(cfg)
    if as_json:
        click.echo(json.dumps(summary, indent=None, sort_keys=True, default=str))
    else:
        bpt = summary["bytes_per_answer_token"]
        click.echo(
            f"shard {summary['shard']}: wrote {summary['written']} samples ({summary['answer_tokens']} answer tokens), "
            f"{summary['already_committed']} already committed, {summary['skipped']} skipped; "
            f"{summary['samples_per_s']:.2f} samples/s, {summary['answer_tokens_per_s']:.0f} answer tokens/s; "
            f"cache {summary['cache_samples']} samples, {summary['bytes_on_disk']} bytes"
            + (f" ({bpt:.0f} B/answer token)" if bpt else "")
        )
        for e in summary["skipped_samples"][:10]:
            click.echo(f"skipped {e['id']!r}: {e['reason']}", err=True)


if __name__ == "__main__":  # pragma: no cover
    main()
