"""``vlsi-extract``: argv -> ExtractConfig -> run_extract -> summary. Heavy imports stay inside the command."""

from __future__ import annotations

import json
import sys

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--teacher", required=True, help="Teacher: local model dir, preset (qwen2-vl-72b) or cached hub id.")
@click.option("--verbalizers", "verbalizers", required=True, metavar="VDIR",
              help="Verbalizers trained for this teacher (vlsi-verbalize --out).")
@click.option("--data", required=True, help="Dataset: LLaVA .json/.jsonl or .parquet.")
@click.option("--image-root", default=None, help="Folder relative image paths resolve against (default: data's folder).")
@click.option("--out", required=True, metavar="CACHE", help="Cache path or fsspec URL (s3://bucket/cache, memory://x).")
@click.option("--top-k", type=int, default=64, show_default=True, help="Top-k entries per answer position and layer.")
@click.option("--layers", default=None, help="Subset of the verbalizers' layers, e.g. 2,6,10 (default: all).")
@click.option("--shard", default="0/1", show_default=True,
              help="I/N: extract the 1/N of samples whose id hashes to I (N workers share one --out).")
@click.option("--resume/--no-resume", default=False, show_default=True,
              help="Continue after samples of this shard already committed to --out (never recomputed).")
@click.option("--batch-size", type=int, default=None, help="Samples per forward (default 8).")
@click.option("--max-tokens-per-batch", type=int, default=None,
              help="Cap on padded tokens per forward (batches of similar length are filled up to it).")
@click.option("--bucket-window", type=int, default=256, show_default=True,
              help="Samples read ahead and sorted by length before batching.")
@click.option("--max-length", type=int, default=None, help="Longer samples are bad samples (see --on-bad-sample).")
@click.option("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available).")
@click.option("--device-map", type=click.Choice(["auto"]), default=None,
              help="auto: spread a teacher bigger than one GPU over all GPUs.")
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True,
              help="Teacher dtype (auto: bf16 on GPU, fp32 on CPU).")
@click.option("--on-bad-sample", type=click.Choice(["error", "skip"]), default="error", show_default=True,
              help="error: stop at the first bad sample; skip: skip and report it.")
@click.option("--bad-sample-report", default=None, help="Write skipped samples (id, reason) here as JSONL.")
@click.option("--backend", type=click.Choice(["transformers", "vllm"]), default="transformers", show_default=True)
@click.option("--backend-option", "backend_option", multiple=True, metavar="KEY=VALUE",
              help="Backend constructor option, repeatable (vllm: any vllm.LLM keyword, e.g. "
                   "gpu_memory_utilization=0.85).")
@click.option("--tensor-parallel-size", type=int, default=1, show_default=True,
              help="vllm backend: GPUs per teacher (tensor parallelism).")
@click.option("--vllm-final", type=click.Choice(["auto", "hidden", "logprobs"]), default="auto", show_default=True,
              help="vllm backend, final layer: hidden (head runs here), logprobs (vLLM's prompt log-probs, unpadded "
                   "heads only), auto (logprobs when the head is not padded).")
@click.option("--commit-every", type=int, default=None,
              help="Commit at least every N samples (default: by size, 64 MiB of raw top-k data).")
@click.option("--storage-option", "storage_option", multiple=True, metavar="KEY=VALUE",
              help="fsspec option for --out, repeatable (e.g. client_kwargs.endpoint_url=http://127.0.0.1:9000).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
def main(teacher, verbalizers, data, image_root, out, top_k, layers, shard, resume, batch_size,
         max_tokens_per_batch, bucket_window, max_length, device, device_map, dtype, on_bad_sample,
         bad_sample_report, backend, backend_option, tensor_parallel_size, vllm_final, commit_every, storage_option,
         as_json, progress):
    """Run the teacher once over DATA and write its per-layer verbalized top-k log-probs into CACHE.

    For every answer position (row t predicts token t+1) and each verbalizer layer plus the final head: the top-k
    token ids, their log-probs under the full softmax over the real vocabulary, and the tail log-mass.
    """
    from vlsi.extract.config import ExtractConfig, parse_layers, parse_shard, parse_storage_options
    from vlsi.models.errors import VlsiError

    try:
        from vlsi.cache_format import CacheError
    except ImportError:  # pragma: no cover - the cache package is part of the distribution
        CacheError = VlsiError  # type: ignore[misc,assignment]
    try:
        config = ExtractConfig(
            teacher=teacher, verbalizers=verbalizers, data=data, out=out, top_k=top_k, image_root=image_root,
            layers=parse_layers(layers), shard=parse_shard(shard), resume=resume, batch_size=batch_size,
            max_tokens_per_batch=max_tokens_per_batch, bucket_window=bucket_window, max_length=max_length,
            device=device, device_map=device_map, dtype=dtype, on_bad_sample=on_bad_sample,
            bad_sample_report=bad_sample_report, backend=backend,
            backend_options=parse_storage_options(backend_option), tensor_parallel_size=tensor_parallel_size,
            vllm_final=vllm_final, commit_every=commit_every,
            storage_options=parse_storage_options(storage_option), progress=progress,
        )
        from vlsi.extract.run import run_extract

        summary = run_extract(config)
    except (VlsiError, CacheError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
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
