"""`vlsi-cache`: info, verify, ls, stats, finalize, compact, merge. Heavy imports live inside the commands."""
from __future__ import annotations

import json
import sys
from dataclasses import fields

import click

from vlsi.common.cli import CONTEXT, field_option, user_errors
from vlsi.common.config import StorageOptions

# The one --storage-option of every command: help from the field's docstring, values parsed by parse_kv.
storage_option = field_option(StorageOptions, next(f for f in fields(StorageOptions) if f.name == "storage_options"))


@click.group(context_settings=CONTEXT)
def main() -> None:
    """Inspect, verify and maintain vlsi teacher caches (Zarr v3, any fsspec URL)."""


@main.command()
@user_errors
@click.argument("cache")
@storage_option
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def info(cache: str, storage_options: dict | None, as_json: bool) -> None:
    """Format, version, sample/token counts, k, layers, fingerprint and size of CACHE."""
    from .reader import open_cache

    d = open_cache(cache, storage_options=storage_options).info()
    if as_json:
        click.echo(json.dumps(d, indent=1))
        return
    fp = d.pop("fingerprint")
    for k, v in d.items():
        click.echo(f"{k:24s} {v}")
    click.echo("fingerprint:")
    for k, v in fp.items():
        click.echo(f"  {k:22s} {json.dumps(v)}")


@main.command()
@user_errors
@click.argument("cache")
@storage_option
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def verify(cache: str, storage_options: dict | None, as_json: bool) -> None:
    """Read everything and check checksums, offsets and bookkeeping. Exit 0 intact, 1 corrupted."""
    from .verify import verify_cache

    rep = verify_cache(cache, storage_options=storage_options)
    if as_json:
        click.echo(json.dumps(rep.to_dict(), indent=1))
    else:
        for p in rep.problems:
            click.echo(f"BAD  {p}")
        for n in rep.notes:
            click.echo(f"note {n}")
        click.echo(f"{'ok' if rep.ok else 'CORRUPTED'}: {rep.n_samples} samples, {rep.n_segments} segments, "
                   f"{rep.n_chunks} chunks checked, {len(rep.problems)} problem(s)")
    sys.exit(0 if rep.ok else 1)


@main.command("ls")
@user_errors
@click.argument("cache")
@storage_option
@click.option("--limit", type=int, default=20, show_default=True, help="rows to show (0 = all)")
@click.option("--filter-min-answer", type=int, default=None, help="only samples with >= N answer positions")
@click.option("--json", "as_json", is_flag=True, help="JSON lines, one sample per line")
def ls_(cache: str, storage_options: dict | None, limit: int, filter_min_answer: int | None,
        as_json: bool) -> None:
    """List the samples of CACHE from its index (no array is read)."""
    import polars as pl

    from .reader import open_cache

    df = pl.from_arrow(open_cache(cache, storage_options=storage_options).index)
    if filter_min_answer is not None:
        df = df.filter(pl.col("n_answer") >= filter_min_answer)
    if limit:
        df = df.head(limit)
    if as_json:
        for row in df.iter_rows(named=True):
            click.echo(json.dumps(row))
    else:
        with pl.Config(tbl_rows=-1, tbl_width_chars=200, fmt_str_lengths=40):
            click.echo(str(df))


@main.command()
@user_errors
@click.argument("cache")
@storage_option
@click.option("--plot", "plot_path", default=None, metavar="PNG",
              help="where to write the per-layer plot (default: cache_stats.png in the current folder; '-' for none)")
@click.option("--limit", type=int, default=None, help="only the first N samples (faster on huge caches)")
@click.option("--reference", default=None, metavar="REF",
              help="another cache of the same teacher and samples (e.g. the exact one CACHE was derived from): "
                   "also show the KL(REF || CACHE) per layer, tails read as uniform over unlisted tokens")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def stats(cache: str, storage_options: dict | None, plot_path: str | None, limit: int | None,
          reference: str | None, as_json: bool) -> None:
    """Per layer: mean top-k mass covered, entropy lower bound, bytes per answer token; and a PNG plot."""
    from .reader import open_cache
    from .stats import cache_stats, format_cache_stats, format_kl_vs_reference, kl_vs_reference, plot_cache_stats

    rd = open_cache(cache, storage_options=storage_options)
    st = cache_stats(rd, limit=limit)
    if reference is not None:
        st["reference"] = kl_vs_reference(rd, open_cache(reference, storage_options=storage_options), limit=limit)
    if plot_path != "-":
        st["plot"] = str(plot_cache_stats(st, plot_path or "cache_stats.png"))
    click.echo(json.dumps(st, indent=1, default=str) if as_json else format_cache_stats(st))
    if not as_json and reference is not None:
        click.echo(format_kl_vs_reference(st["reference"]))
    if not as_json and "plot" in st:
        click.echo(f"plot: {st['plot']}")


@main.command()
@user_errors
@click.argument("src")
@click.argument("dst")
@storage_option
@click.option("--layers", default=None, metavar="I,J,...",
              help="target layers to keep (comma-separated ids of the source's; the final head is always kept)")
@click.option("--top-k", "top_k", type=int, default=None, help="keep the first K entries per row (<= the source's)")
@click.option("--encoding", default=None, metavar="E",
              help="value encoding of DST: exact (= fp16-logprob) or topk1-<plain|sorted|prev>-<fp16|q8|q6>[-m<eps>]")
@click.option("--limit", type=int, default=None, help="only the first N samples")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def derive(src: str, dst: str, storage_options: dict | None, layers: str | None, top_k: int | None,
           encoding: str | None, limit: int | None, as_json: bool) -> None:
    """Write a smaller cache DST from SRC without the teacher: fewer layers, smaller k, another encoding.

    DST's fingerprint records the derivation (derived_from); an interrupted derive resumes when run again."""
    from tqdm import tqdm

    from .derive import derive as run
    from .errors import CacheError

    try:
        lay = None if layers is None else [int(x) for x in layers.split(",") if x.strip()]
    except ValueError:
        raise CacheError(f"--layers: expected comma-separated integers, got {layers!r}") from None
    with tqdm(desc="derive", unit="sample", disable=as_json) as bar:
        d = run(src, dst, layers=lay, top_k=top_k, encoding=encoding, storage_options=storage_options,
                limit=limit, progress=bar.update)
    click.echo(json.dumps(d) if as_json else "\n".join(f"{k:16s} {v}" for k, v in d.items()))


@main.command()
@user_errors
@click.argument("cache")
@storage_option
def finalize(cache: str, storage_options: dict | None) -> None:
    """Write a consolidated manifest + Parquet index for fast remote opens."""
    from .compact import finalize as fin

    click.echo(f"generation {fin(cache, storage_options=storage_options)}")


@main.command()
@user_errors
@click.argument("cache")
@storage_option
@click.option("--segment-mb", type=int, default=512, show_default=True, help="target raw MB per new segment")
@click.option("--delete-retired", is_flag=True, help="delete the old segments after the switch")
def compact(cache: str, storage_options: dict | None, segment_mb: int, delete_retired: bool) -> None:
    """Rewrite many small segments/parts into a few large ones, switched atomically by a new manifest."""
    from .compact import compact as run

    d = run(cache, storage_options=storage_options, segment_bytes=segment_mb << 20,
            delete_retired=delete_retired)
    click.echo(json.dumps(d))


@main.command()
@user_errors
@click.argument("cache")
@click.argument("sources", nargs=-1, required=True)
@storage_option
@click.option("--skip-existing", is_flag=True, help="skip ids CACHE already has instead of failing")
def merge(cache: str, sources: tuple[str, ...], storage_options: dict | None, skip_existing: bool) -> None:
    """Copy every sample of SOURCES (same fingerprint) into a new part of CACHE."""
    from .compact import merge as run

    n = run(cache, list(sources), storage_options=storage_options, source_storage_options=storage_options,
            skip_existing=skip_existing)
    click.echo(f"merged {n} samples")


if __name__ == "__main__":
    main()
