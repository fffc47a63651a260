"""`vlsi-demo --quick --genrecal`: the demo plus its GenRecal arm (a student with another tokenizer, from the same
trained teacher, GenRecal vs SFT only of that student), end to end at the CI budget."""

from __future__ import annotations

import json

from click.testing import CliRunner

from vlsi.demo.cli import main


def test_the_other_tokenizer_really_differs():
    from vlsi.demo import tiny
    from vlsi.demo.genrecal_arm import OTHER_VOCAB, other_tokenizer

    demo, other = tiny.build_tokenizer(family="qwen2_vl"), other_tokenizer()
    assert len(other) == OTHER_VOCAB != len(demo)
    assert tiny._padded(len(other)) != tiny._padded(len(demo))  # another embedding size too
    text = "What colour is the circle left of the square?"
    assert demo.tokenize(text) != other.tokenize(text)
    vd, vo = demo.get_vocab(), other.get_vocab()
    merged = [t for t in set(vd) & set(vo) if len(t) > 1 and t not in tiny.SPECIAL_TOKENS]
    assert merged and sum(vd[t] == vo[t] for t in merged) < 0.2 * len(merged)  # merges learnt in another order
    assert other.decode(other(text)["input_ids"]) == text


def test_demo_quick_genrecal_arm(tmp_path):
    from vlsi.cache_format import open_cache
    from vlsi.demo.genrecal_arm import LABEL_GENRECAL, LABEL_SFT
    from vlsi.demo.pipeline import format_summary

    out = tmp_path / "demo"
    res = CliRunner().invoke(main, ["--quick", "--genrecal", "--out", str(out), "--no-progress", "--json"])
    assert res.exit_code == 0, res.output[-2000:]
    summary = json.loads(res.output[res.output.index("{"):])
    rows = summary["results"]
    assert [r["model"] for r in rows[-2:]] == [LABEL_SFT, LABEL_GENRECAL] and len(rows) == 5
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["n"] == 32
    assert rows[-1]["steps"] == rows[-2]["steps"] == rows[1]["steps"]  # the same budget as the demo's students
    for r in rows[-2:]:  # the demo's evaluation: the fresh test split too, as for the other rows
        assert (r["fresh_accuracy"] is None) == (rows[0]["fresh_accuracy"] is None)
    g = summary["genrecal"]
    assert sum(g["steps"].values()) == rows[-1]["steps"]
    assert g["tokenizers"]["student"]["size"] != g["tokenizers"]["teacher"]["size"]
    assert g["tokenizers"]["student"]["split"] != g["tokenizers"]["teacher"]["split"]
    info = open_cache(str(out / "cache-features")).info()
    assert info["hidden_states"] == "answer" and info["hidden_size"] == 128 and info["n_samples"] == 160
    assert g["features"]["bytes_per_sample"] == info["bytes_per_sample"] > g["features"]["hidden_answer_bytes_per_sample"] > 0
    gr_run = out / "runs" / "student-othertok-genrecal"
    done = json.loads((gr_run / "summary.json").read_text())
    assert done["finished"] and sorted(done["stages"]) == ["joint", "recalibrate", "sft"]
    assert (gr_run / "recalibrator" / "recalibrator.safetensors").is_file()
    tok = json.loads((gr_run / "final" / "tokenizer_config.json").read_text())
    assert tok  # the exported student is a plain HF directory with its own tokenizer
    table = format_summary(summary)
    assert LABEL_SFT in table and LABEL_GENRECAL in table and "features cache" in table
