"""vlsi.eval: `vlsi-eval` - greedy generation + scoring, per-layer verbalized answers, layer-matching plots.

Modules (import the one you need; nothing heavy is imported here, so `vlsi-eval --help` stays instant):

- ``scoring``: ``extract_choice``, ``normalize_answer``, ``score``, ``aggregate`` (pure functions).
- ``mmbench``: ``read_mmbench_tsv`` (MMBench-style TSV -> ``Sample``).
- ``prompting``: ``encode_prompt`` (conversation up to the last user turn + generation prompt).
- ``generate``: ``generate_answers`` / ``generate_ids`` (batched greedy, left padding, real vocab only).
- ``run``: ``run_eval`` -> results dict, ``format_table``, ``load_eval_samples``.
- ``layers``: ``layer_answers`` (each target layer's greedy answer through its verbalizer); ``layer_view``: table/PNG.
- ``matching``: ``matching_report`` (start-vs-end matching heatmap + per-layer KL curves from metrics.jsonl).
- ``cli``: ``main`` (click group; ``run`` is the default command).
"""
