"""The indexed dataset: random access equals a plain read, the index is built once and rebuilt when the file
changes, bad lines name file:line and id, images are read only on load, JSON lists stream, fsspec URLs work."""

from __future__ import annotations

import json
import os
import pickle

import pytest

from vlsi.models import dataset as dataset_mod
from vlsi.models.data import BadSamplePolicy, read_dataset
from vlsi.models.dataset import open_dataset
from vlsi.models.errors import BadSampleError, DatasetError


def _records(n: int, *, image: str | None = "img/a.png", text: str = "What colour?"):
    return [{"id": f"s{i:04d}", **({"image": image} if image else {}),
             "conversations": [{"from": "human", "value": f"<image>\n{text} {i}" if image else f"{text} {i}"},
                               {"from": "gpt", "value": f"answer {i} – ünïcødé"}], "category": "c"}
            for i in range(n)]


@pytest.fixture
def files(tmp_path, make_png):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(make_png(0))
    return tmp_path


def _write(path, recs, *, kind):
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    else:
        path.write_text(json.dumps(recs, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json"])
def test_random_access_equals_reading_in_order(files, kind, monkeypatch):
    monkeypatch.setattr(dataset_mod, "_BLOCK", 97)  # many refills: element spans cross block edges (and UTF-8)
    p = _write(files / f"d.{kind}", _records(40), kind=kind)
    ds = open_dataset(p)
    seq = list(read_dataset(p))
    assert len(ds) == len(seq) == 40
    for i in (17, 3, 39, 0, 17):
        s = ds[i]
        assert s.id == seq[i].id == ds.sample_id(i) and s.content_hash == seq[i].content_hash
        assert s.images and s.meta == {"category": "c"} and "ünïcødé" in s.turns[-1].text


def test_parquet_random_access(files, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = _records(30)
    png = (files / "img" / "a.png").read_bytes()
    table = pa.table({"id": [r["id"] for r in recs],
                      "image": [{"bytes": png, "path": "a.png"} for _ in recs],
                      "conversations": [json.dumps(r["conversations"]) for r in recs]})
    p = tmp_path / "d.parquet"
    pq.write_table(table, p, row_group_size=7)
    ds = open_dataset(p)
    assert len(ds) == 30
    assert [ds[i].id for i in (29, 0, 8, 7)] == ["s0029", "s0000", "s0008", "s0007"]
    assert ds[12].images == [png]


def test_index_is_built_once_and_rebuilt_when_the_file_changes(files, monkeypatch):
    p = _write(files / "d.jsonl", _records(10), kind="jsonl")
    builds = []
    real = dataset_mod.Dataset._build
    monkeypatch.setattr(dataset_mod.Dataset, "_build", lambda self, *a: (builds.append(1), real(self, *a))[1])
    assert len(open_dataset(p)) == 10 and len(builds) == 1
    assert len(open_dataset(p)) == 10 and len(builds) == 1  # reused
    st = os.stat(p)
    _write(p, _records(11), kind="jsonl")  # grown
    assert len(open_dataset(p)) == 11 and len(builds) == 2
    # same size and modification time, other bytes: the content digest still tells them apart
    recs = _records(11)
    recs[0]["conversations"][1]["value"] = recs[0]["conversations"][1]["value"].replace("answer", "ANSWER")
    before = os.stat(p)
    _write(p, recs, kind="jsonl")
    os.utime(p, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(p).st_size == before.st_size and st.st_size != before.st_size
    ds = open_dataset(p)
    assert len(builds) == 3 and "ANSWER" in ds[0].turns[-1].text


def test_a_file_changed_under_an_open_dataset_is_refused(files):
    p = _write(files / "d.jsonl", _records(6), kind="jsonl")
    ds = open_dataset(p)
    ds[3]
    _write(p, _records(6)[::-1], kind="jsonl")  # same lines, other order
    ds._local.file = None  # a new worker / process opens the file again
    with pytest.raises(DatasetError, match=r"d.jsonl:4: the file changed after its index was built"):
        ds[3]
    assert open_dataset(p)[3].id == "s0002"  # reopened: a new index, the right sample


def test_corrupt_line_names_file_line_and_id(files):
    lines = [json.dumps(r) for r in _records(9)]
    lines[5] = lines[5][:-7]  # truncated object in the middle of the file
    p = files / "d.jsonl"
    p.write_text("\n".join(lines) + "\n")
    ds = open_dataset(p)
    assert len(ds) == 8
    (err,) = ds.bad_entries
    assert err.source == f"{p}:6" and err.sample_id == "s0005" and "malformed JSON line" in err.reason
    with pytest.raises(BadSampleError, match=rf"{p}:6: sample 's0005': malformed JSON line"):
        list(read_dataset(p))
    policy = BadSamplePolicy("skip")
    assert [s.id for s in read_dataset(p, on_bad_sample=policy)] == [f"s{i:04d}" for i in range(9) if i != 5]
    assert policy.report.ids == ["s0005"]


def test_duplicate_ids_keep_the_first(files):
    recs = _records(5)
    recs[3]["id"] = "s0001"
    ds = open_dataset(_write(files / "d.jsonl", recs, kind="jsonl"))
    assert [ds.sample_id(i) for i in range(len(ds))] == ["s0000", "s0001", "s0002", "s0004"]
    assert [(e.sample_id, "duplicate id" in e.reason) for e in ds.bad_entries] == [("s0001", True)]


def test_images_are_read_on_load_and_a_missing_one_is_a_bad_sample(files):
    recs = _records(4)
    recs[2]["image"] = "img/gone.png"
    ds = open_dataset(_write(files / "d.jsonl", recs, kind="jsonl"))
    assert len(ds) == 4 and not ds.bad_entries  # indexing reads no image
    with pytest.raises(BadSampleError, match=r"d.jsonl:3: sample 's0002': image not found"):
        ds[2]


def test_index_costs_bytes_per_sample_and_pickles_small(files):
    p = _write(files / "d.jsonl", _records(2000), kind="jsonl")
    ds = open_dataset(p)
    size = sum(f.stat().st_size for f in ds.index_path.iterdir())
    assert size / len(ds) < 48  # 5-byte ids + 3 int64 per sample (+ headers)
    len(ds), ds[5]  # maps the index and opens the file
    blob = pickle.dumps(ds)
    assert len(blob) < 2000
    again = pickle.loads(blob)
    assert again[1999].id == "s1999"


def test_json_list_errors_are_whole_file_errors(tmp_path):
    (tmp_path / "obj.json").write_text('{"id": "x"}')
    with pytest.raises(DatasetError, match="top level must be a list"):
        open_dataset(tmp_path / "obj.json")
    (tmp_path / "cut.json").write_text('[{"id": "a", "conversations": []}, {"id": "b", "conv')
    with pytest.raises(DatasetError, match="malformed JSON"):
        open_dataset(tmp_path / "cut.json")
    with pytest.raises(DatasetError, match="not found"):
        open_dataset(tmp_path / "none.jsonl")


def test_fsspec_urls_for_data_and_images(files):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/vlsi-test/imgs/img/a.png", (files / "img" / "a.png").read_bytes())
    fs.pipe("/vlsi-test/d.jsonl", "".join(json.dumps(r) + "\n" for r in _records(6)).encode())
    ds = open_dataset("memory://vlsi-test/d.jsonl", image_root="memory://vlsi-test/imgs")
    assert len(ds) == 6 and ds[4].id == "s0004" and ds[4].images == [(files / "img" / "a.png").read_bytes()]
    assert [s.id for s in read_dataset("memory://vlsi-test/d.jsonl", image_root="memory://vlsi-test/imgs")][-1] \
        == "s0005"
