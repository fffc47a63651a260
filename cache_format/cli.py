"""`vlsi-cache`: info, verify, ls, stats, finalize, compact, merge. Heavy imports live inside the commands."""
from __future__ import annotations

import json
import sys

import click


def _opts(pairs: tuple[str, ...]) -> dict | None:
    out = {}
    for p in pairs:
        if "=" not in p:
            raise click.UsageError(f"--storage-option expects key=value, got {p!r}")
        k, v = p.split("=", 1)
        try:  # numbers / booleans / JSON objects pass through as JSON
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out or None


def _run(fn):
    """Run a command body; CacheErrors become `error: <one line>` with exit status 2."""
    from .errors import CacheError

    try:
        return fn()
    except CacheError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


storage_option = click.option("--storage-option", "-o", "storage_options", multiple=True, metavar="KEY=VALUE",
                              help="fsspec storage option (repeatable), e.g. -o endpoint_url=http://127.0.0.1:9000")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Inspect, verify and maintain vlsi teacher caches (Zarr v3, any fsspec URL)."""


@main.command()
@click.argument("cache")
@storage_option
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def info(cache: str, storage_options: tuple[str, ...], as_json: bool) -> None:
    """Format, version, sample/token counts, k, layers, fingerprint and size of CACHE."""
    def body():
        from .reader import open_cache

        d = open_cache(cache, storage_options=_opts(storage_options)).info()
        if as_json:
            click.echo(json.dumps(d, indent=1))
            return
        fp = d.pop("fingerprint")
        for k, v in d.items():
            click.echo(f"{k:24s} {v}")
        click.echo("fingerprint:")
        for k, v in fp.items():
            click.echo(f"  {k:22s} {json.dumps(v)}")
    _run(body)


@main.command()
@click.argument("cache")
@storage_option
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def verify(cache: str, storage_options: tuple[str, ...], as_json: bool) -> None:
    """Read everything and check checksums, offsets and bookkeeping. Exit 0 intact, 1 corrupted."""
    def body():
        from .verify import verify_cache

        rep = verify_cache(cache, storage_options=_opts(storage_options))
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
    _run(body)


@main.command("ls")
@click.argument("cache")
@storage_option
@click.option("--limit", type=int, default=20, show_default=True, help="rows to show (0 = all)")
@click.option("--filter-min-answer", type=int, default=None, help="only samples with >= N answer positions")
@click.option("--json", "as_json", is_flag=True, help="JSON lines, one sample per line")
def ls_(cache: str, storage_options: tuple[str, ...], limit: int, filter_min_answer: int | None,
        as_json: bool) -> None:
    """List the samples of CACHE from its index (no array is read)."""
    def body():
        import polars as pl

        from .reader import open_cache

        df = pl.from_arrow(open_cache(cache, storage_options=_opts(storage_options)).index)
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
    _run(body)


@main.command()
@click.argument("cache")
@storage_option
@click.option("--plot", "plot_path", default=None, metavar="PNG",
              help="where to write the per-layer plot (default: cache_stats.png in the current folder; '-' for none)")
@click.option("--limit", type=int, default=None, help="only the first N samples (faster on huge caches)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def stats(cache: str, storage_options: tuple[str, ...], plot_path: str | None, limit: int | None,
          as_json: bool) -> None:
    """Per layer: mean top-k mass covered, entropy lower bound, bytes per answer token; and a PNG plot."""
    def body():
        from .reader import open_cache
        from .stats import cache_stats, format_cache_stats, plot_cache_stats

        st = cache_stats(open_cache(cache, storage_options=_opts(storage_options)), limit=limit)
        if plot_path != "-":
            st["plot"] = str(plot_cache_stats(st, plot_path or "cache_stats.png"))
        click.echo(json.dumps(st, indent=1, default=str) if as_json else format_cache_stats(st))
        if not as_json and "plot" in st:
            click.echo(f"plot: {st['plot']}")
    _run(body)


@main.command()
@click.argument("cache")
@storage_option
def finalize(cache: str, storage_options: tuple[str, ...]) -> None:
    """Write a consolidated manifest + Parquet index for fast remote opens."""
    def body():
        from .compact import finalize as fin

        click.echo(f"generation {fin(cache, storage_options=_opts(storage_options))}")
    _run(body)


@main.command()
@click.argument("cache")
@storage_option
@click.option("--segment-mb", type=int, default=512, show_default=True, help="target raw MB per new segment")
@click.option("--delete-retired", is_flag=True, help="delete the old segments after the switch")
def compact(cache: str, storage_options: tuple[str, ...], segment_mb: int, delete_retired: bool) -> None:
    """Rewrite many small segments/parts into a few large ones, switched atomically by a new manifest."""
    def body():
        from .compact import compact as run

        d = run(cache, storage_options=_opts(storage_options), segment_bytes=segment_mb << 20,
                delete_retired=delete_retired)
        click.echo(json.dumps(d))
    _run(body)


@main.command()
@click.argument("cache")
@click.argument("sources", nargs=-1, required=True)
@storage_option
@click.option("--skip-existing", is_flag=True, help="skip ids CACHE already has instead of failing")
def merge(cache: str, sources: tuple[str, ...], storage_options: tuple[str, ...], skip_existing: bool) -> None:
    """Copy every sample of SOURCES (same fingerprint) into a new part of CACHE."""
    def body():
        from .compact import merge as run

        so = _opts(storage_options)
        n = run(cache, list(sources), storage_options=so, source_storage_options=so, skip_existing=skip_existing)
        click.echo(f"merged {n} samples")
    _run(body)


if __name__ == "__main__":
    main()
