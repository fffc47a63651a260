"""Dataset readers: LLaVA JSON / JSONL / Parquet, content hashes, bad-sample policy, LLaVA writer."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import struct
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlsi.models.data import (
    BadSamplePolicy,
    BadSampleReport,
    Sample,
    Turn,
    content_hash,
    read_dataset,
    write_llava_json,
)
from vlsi.models.errors import BadSampleError, DatasetError, VlsiError


def _png(colour, size=(5, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="JPEG")
    return buf.getvalue()


RED, BLUE, GREEN = _png((255, 0, 0)), _png((0, 0, 255)), _jpeg((0, 200, 0))


def _conv(*pairs):
    return [{"from": f, "value": v} for f, v in pairs]


# The same five samples, as LLaVA JSON records (paths relative to the data file's folder).
RECORDS = [
    {"id": "single", "image": "img/red.png", "category": "colour", "answer": "red",
     "conversations": _conv(("human", "<image>\nWhat colour?"), ("gpt", "red"))},
    {"id": "two", "image": ["img/red.png", "img/green.jpg"],
     "conversations": _conv(("human", "<image>\n<image>\nSame colour?"), ("gpt", "no"))},
    {"id": "text", "conversations": _conv(("human", "What is 2 plus 2?"), ("gpt", "4"))},
    {"id": "multi", "image": "img/blue.png",
     "conversations": _conv(("human", "<image>\nWhat colour?"), ("gpt", "blue"), ("human", "And shape?"),
                            ("gpt", "square"))},
    {"id": 17, "image": "img/blue.png", "options": ["a", "b"],
     "conversations": [{"from": "system", "value": "Be brief."}, {"role": "user", "content": "<image>\nHi"},
                       {"role": "assistant", "content": "Hello"}]},
]


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    img = tmp_path / "img"
    img.mkdir()
    (img / "red.png").write_bytes(RED)
    (img / "blue.png").write_bytes(BLUE)
    (img / "green.jpg").write_bytes(GREEN)
    (tmp_path / "d.json").write_text(json.dumps(RECORDS))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n\n")
    return tmp_path


def _reference_hash(turns, images) -> str:
    """Independent implementation of the documented v1 encoding."""
    def lp(b: bytes) -> bytes:
        return struct.pack("<Q", len(b)) + b
    blob = b"vlsi.sample.v1\n" + struct.pack("<Q", len(turns))
    blob += b"".join(lp(r.encode()) + lp(t.encode("utf-8")) for r, t in turns)
    blob += struct.pack("<Q", len(images)) + b"".join(lp(i) for i in images)
    return hashlib.sha256(blob).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# reading


@pytest.mark.parametrize("name", ["d.json", "d.jsonl"])
def test_llava_json_and_jsonl(data_dir, name):
    samples = {s.id: s for s in read_dataset(data_dir / name)}
    assert list(samples) == ["single", "two", "text", "multi", "17"]  # file order; int ids become strings

    s = samples["single"]
    assert s.turns == [Turn("user", "<image>\nWhat colour?"), Turn("assistant", "red")]
    assert s.images == [RED] and s.image_names == ["img/red.png"]
    assert s.meta == {"category": "colour", "answer": "red"}
    assert s.source == (f"{data_dir / name}:1" if name.endswith(".jsonl") else f"{data_dir / name}[0]")

    assert samples["two"].images == [RED, GREEN]
    assert [im.getpixel((0, 0)) for im in samples["two"].pil_images()][0] == (255, 0, 0)
    assert all(im.mode == "RGB" for im in samples["two"].pil_images())

    assert samples["text"].images == [] and samples["text"].pil_images() == []
    assert [t.role for t in samples["multi"].turns] == ["user", "assistant", "user", "assistant"]
    assert samples["17"].turns == [Turn("system", "Be brief."), Turn("user", "<image>\nHi"),
                                   Turn("assistant", "Hello")]
    assert samples["17"].meta == {"options": ["a", "b"]}
    for s in samples.values():
        assert s.content_hash == _reference_hash([(t.role, t.text) for t in s.turns], s.images)


def test_image_root(data_dir, tmp_path_factory):
    other = tmp_path_factory.mktemp("elsewhere")
    (other / "d.json").write_text(json.dumps(RECORDS[:1]))
    with pytest.raises(BadSampleError, match="image not found"):
        list(read_dataset(other / "d.json"))  # default root: the data file's folder, which has no img/
    (s,) = read_dataset(other / "d.json", image_root=data_dir)
    assert s.images == [RED]
    with pytest.raises(DatasetError, match="image-root"):
        read_dataset(other / "d.json", image_root=other / "nope")


def test_missing_placeholders_follow_llava_convention(data_dir):
    recs = [
        {"id": "a", "image": ["img/red.png", "img/blue.png"],
         "conversations": _conv(("system", "sys"), ("human", "Same?"), ("gpt", "no"), ("human", "Sure?"),
                                ("gpt", "yes"))},
    ]
    (data_dir / "np.json").write_text(json.dumps(recs))
    (s,) = read_dataset(data_dir / "np.json")
    assert s.turns[1] == Turn("user", "<image>\n<image>\nSame?")  # first USER turn, not the system turn
    assert s.turns[3] == Turn("user", "Sure?")
    recs[0]["conversations"][1]["value"] = "<image>\n<image>\nSame?"
    (data_dir / "explicit.json").write_text(json.dumps(recs))
    (e,) = read_dataset(data_dir / "explicit.json")
    assert e.content_hash == s.content_hash


def _parquet_tables(data_dir: Path) -> dict[str, pa.Table]:
    """The same samples in the Parquet layouts seen in public VLM instruction sets."""
    img_struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    conv_type = pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))
    by_path = {"img/red.png": RED, "img/blue.png": BLUE, "img/green.jpg": GREEN}

    def refs(r):
        p = r.get("image")
        return [] if p is None else [p] if isinstance(p, str) else p

    def convs(r):  # normalise role/content records to the LLaVA spelling, as such exports do
        return [{"from": c.get("from", {"user": "human", "assistant": "gpt"}.get(c.get("role"))),
                 "value": c.get("value", c.get("content"))} for c in r["conversations"]]

    ids = [str(r["id"]) for r in RECORDS]
    # `images`: list of {bytes, path} structs; conversations: list of structs
    images_list = pa.table({
        "id": ids,
        "images": pa.array([[{"bytes": by_path[p], "path": p} for p in refs(r)] for r in RECORDS],
                           pa.list_(img_struct)),
        "conversations": pa.array([convs(r) for r in RECORDS], conv_type),
    })
    # `image`: list of raw binaries; conversations as a JSON string
    image_binary = pa.table({
        "id": ids,
        "image": pa.array([[by_path[p] for p in refs(r)] or None for r in RECORDS], pa.list_(pa.binary())),
        "conversations": [json.dumps(convs(r)) for r in RECORDS],
    })
    return {"images_list": images_list, "image_binary": image_binary}


@pytest.mark.parametrize("layout", ["images_list", "image_binary"])
def test_same_hash_across_formats(data_dir, layout):
    table = _parquet_tables(data_dir)[layout]
    pq.write_table(table, data_dir / "d.parquet", row_group_size=2)
    ref = {s.id: s for s in read_dataset(data_dir / "d.json")}
    got = {s.id: s for s in read_dataset(data_dir / "d.parquet")}
    assert list(got) == list(ref)
    for sid, s in got.items():
        assert s.images == ref[sid].images
        assert s.content_hash == ref[sid].content_hash, sid
    assert {s.content_hash for s in read_dataset(data_dir / "d.jsonl")} == {s.content_hash for s in ref.values()}


def test_parquet_single_struct_image_and_path_only(data_dir):
    img_struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({
        "id": ["s", "p", "t"],
        "image": pa.array([{"bytes": RED, "path": "x.png"}, {"bytes": None, "path": "img/blue.png"}, None],
                          img_struct),
        "conversations": [json.dumps(_conv(("human", "<image>\nQ"), ("gpt", "A")))] * 2
        + [json.dumps(_conv(("human", "Q"), ("gpt", "A")))],
        "source": ["one", "two", "three"],
    })
    pq.write_table(table, data_dir / "s.parquet")
    s, p, t = read_dataset(data_dir / "s.parquet")
    assert s.images == [RED] and s.image_names == ["x.png"] and s.meta == {"source": "one"}
    assert p.images == [BLUE]  # bytes absent: the path resolves against the image root (the file's folder)
    assert t.images == []


def test_content_hash_sensitivity():
    base = Sample("x", [Turn("user", "<image>\nq"), Turn("assistant", "a")], [RED], ["r.png"], {"k": 1})
    h = base.content_hash
    assert h == content_hash(base.turns, base.images)
    assert len(h) == 64 and int(h, 16) >= 0
    # id, names and meta are not content
    assert Sample("y", base.turns, [RED], ["other.png"], {"k": 2}).content_hash == h
    changed = [
        Sample("x", [Turn("user", "<image>\nq "), Turn("assistant", "a")], [RED]),
        Sample("x", [Turn("system", "<image>\nq"), Turn("assistant", "a")], [RED]),
        Sample("x", [Turn("user", "<image>\nq"), Turn("assistant", "a")], [BLUE]),
        Sample("x", [Turn("user", "<image>\nqa")], [RED]),  # concatenation must not collide
        Sample("x", [Turn("user", "<image>\n<image>\nq"), Turn("assistant", "a")], [RED, BLUE]),
        Sample("x", [Turn("user", "<image>\n<image>\nq"), Turn("assistant", "a")], [BLUE, RED]),
    ]
    hashes = {s.content_hash for s in changed}
    assert h not in hashes and len(hashes) == len(changed)


def test_pil_images_unreadable_bytes():
    s = Sample("bad", [Turn("user", "<image>\nq"), Turn("assistant", "a")], [RED[:40]], ["t.png"])
    with pytest.raises(BadSampleError, match=r"sample 'bad'.*unreadable image t.png") as ei:
        s.pil_images()
    assert ei.value.sample_id == "bad" and "\n" not in str(ei.value)


# ---------------------------------------------------------------------------------------------------------------
# bad samples

GOOD = {"id": "good", "conversations": _conv(("human", "q"), ("gpt", "a"))}

# (case name, record or raw JSONL line, expected id in the error, expected reason fragment)
BAD_CASES = [
    ("missing_image", {"id": "m", "image": "img/none.png", "conversations": _conv(("human", "<image>q"), ("gpt", "a"))},
     "m", "image not found"),
    ("garbage_image", {"id": "g", "image": "img/garbage.png",
                       "conversations": _conv(("human", "<image>q"), ("gpt", "a"))}, "g", "unreadable image"),
    ("truncated_image", {"id": "tr", "image": "img/trunc.png",
                         "conversations": _conv(("human", "<image>q"), ("gpt", "a"))}, "tr", "unreadable image"),
    ("too_many_placeholders", {"id": "p2", "image": "img/red.png",
                               "conversations": _conv(("human", "<image><image>q"), ("gpt", "a"))},
     "p2", "2 <image> placeholder(s) but 1 image(s)"),
    ("placeholder_without_image", {"id": "p0", "conversations": _conv(("human", "<image>q"), ("gpt", "a"))},
     "p0", "1 <image> placeholder(s) but 0 image(s)"),
    ("placeholder_in_answer", {"id": "pa", "image": "img/red.png",
                               "conversations": _conv(("human", "q"), ("gpt", "<image>a"))},
     "pa", "placeholder in an assistant turn"),
    ("no_assistant", {"id": "na", "conversations": _conv(("human", "q"))}, "na", "no assistant turn"),
    ("empty_conversations", {"id": "ec", "conversations": []}, "ec", "no assistant turn"),
    ("unknown_role", {"id": "ur", "conversations": _conv(("bot", "q"), ("gpt", "a"))}, "ur", "unknown role 'bot'"),
    ("empty_id", {"id": "  ", "conversations": _conv(("human", "q"), ("gpt", "a"))}, "  ", "empty id"),
    ("missing_id", {"conversations": _conv(("human", "q"), ("gpt", "a"))}, None, "missing id"),
    ("duplicate_id", dict(GOOD), "good", "duplicate id"),
    ("malformed_line", '{"id": "x", "conversations": [', "x", "malformed JSON line"),  # the id is read from the broken line
]


def _write_bad(tmp_path: Path, bad) -> Path:
    img = tmp_path / "img"
    img.mkdir(exist_ok=True)
    (img / "red.png").write_bytes(RED)
    (img / "garbage.png").write_bytes(b"this is not an image")
    (img / "trunc.png").write_bytes(_png((1, 2, 3), (64, 64))[:60])
    lines = [json.dumps(GOOD), bad if isinstance(bad, str) else json.dumps(bad),
             json.dumps({**GOOD, "id": "after"})]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("case,bad,sid,reason", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_sample_error(tmp_path, case, bad, sid, reason):
    path = _write_bad(tmp_path, bad)
    it = read_dataset(path)
    assert next(it).id == "good"  # samples before the bad one come through
    with pytest.raises(BadSampleError) as ei:
        next(it)
    err = ei.value
    msg = str(err)
    assert "\n" not in msg
    assert f"{path}:2" in msg  # file and line
    assert reason in msg and reason in err.reason
    assert err.sample_id == sid
    if sid is not None:
        assert repr(sid) in msg
    assert isinstance(err, VlsiError)
    assert pickle.loads(pickle.dumps(err)).args == err.args


@pytest.mark.parametrize("case,bad,sid,reason", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_sample_skip(tmp_path, case, bad, sid, reason):
    path = _write_bad(tmp_path, bad)
    report = BadSampleReport()
    ids = [s.id for s in read_dataset(path, on_bad_sample="skip", report=report)]
    assert ids == ["good", "after"]
    assert report.count == 1 and report.ids == [sid]
    assert reason in report.entries[0].reason
    out = report.write(tmp_path / "rep" / "skipped.jsonl")
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["id"] == sid and reason in row["reason"] and row["source"] == f"{path}:2"


def test_json_list_bad_entries_named_by_index(tmp_path):
    (tmp_path / "l.json").write_text(json.dumps([GOOD, "not an object", {**GOOD, "id": "z", "conversations": 3}]))
    with pytest.raises(BadSampleError, match=r"l\.json\[1\]: .*record must be an object"):
        list(read_dataset(tmp_path / "l.json"))
    report = BadSampleReport()
    assert [s.id for s in read_dataset(tmp_path / "l.json", on_bad_sample="skip", report=report)] == ["good"]
    assert [e.reason for e in report.entries] == ["record must be an object, got str",
                                                  "conversations must be a list, got int"]


def test_policy_is_shared_with_later_checks(data_dir):
    policy = BadSamplePolicy("skip")
    samples = list(read_dataset(data_dir / "d.json", on_bad_sample=policy))
    # a later check (e.g. over --max-length at encoding time) reports through the same object
    policy.handle(samples[0].bad("1234 tokens > --max-length 1000"))
    assert policy.report.count == 1 and policy.report.entries[0].id == "single"
    assert policy.report.entries[0].source == f"{data_dir / 'd.json'}[0]"
    strict = BadSamplePolicy("error")
    with pytest.raises(BadSampleError, match=r"d\.json\[0\]: sample 'single': 1234 tokens"):
        strict.handle(samples[0].bad("1234 tokens > --max-length 1000"))
    with pytest.raises(ValueError, match="on_bad_sample"):
        BadSamplePolicy("ignore")


def test_file_level_errors(tmp_path):
    # raised at call time, before iteration: a CLI fails fast, before loading any model
    with pytest.raises(DatasetError, match="not found"):
        read_dataset(tmp_path / "nope.json")
    (tmp_path / "d.csv").write_text("id\n")
    with pytest.raises(DatasetError, match="unknown dataset format '.csv'"):
        read_dataset(tmp_path / "d.csv")
    (tmp_path / "o.json").write_text('{"id": 1}')
    with pytest.raises(DatasetError, match="top level must be a list"):
        read_dataset(tmp_path / "o.json")
    (tmp_path / "m.json").write_text('[{"id": 1}')
    with pytest.raises(DatasetError, match="malformed JSON"):
        read_dataset(tmp_path / "m.json")
    pq.write_table(pa.table({"id": ["a"]}), tmp_path / "c.parquet")
    with pytest.raises(DatasetError, match=r"missing column\(s\) \['conversations'\]"):
        read_dataset(tmp_path / "c.parquet")
    (tmp_path / "x.parquet").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="not a readable Parquet file"):
        read_dataset(tmp_path / "x.parquet")


# ---------------------------------------------------------------------------------------------------------------
# writing


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_write_llava_round_trip(data_dir, tmp_path_factory, suffix):
    src = list(read_dataset(data_dir / "d.json"))
    out = tmp_path_factory.mktemp("out")
    path = write_llava_json(src, out / f"sub/data{suffix}", image_dir=out / "images")
    back = list(read_dataset(path))
    assert [s.id for s in back] == [s.id for s in src]
    assert [s.content_hash for s in back] == [s.content_hash for s in src]
    assert [s.meta for s in back] == [s.meta for s in src]
    # verbatim, content-addressed images: 3 distinct images (blue is used twice), JPEG kept as JPEG
    files = sorted(p.name for p in (out / "images").iterdir())
    assert len(files) == 3 and sum(f.endswith(".jpg") for f in files) == 1
    assert back[0].image_names[0].startswith("../images/")
    # rerun writes identical bytes
    before = path.read_bytes()
    write_llava_json(src, path, image_dir=out / "images")
    assert path.read_bytes() == before


def test_write_rejects_meta_clash(tmp_path):
    s = Sample("a", [Turn("user", "q"), Turn("assistant", "a")], [], meta={"conversations": 1})
    with pytest.raises(DatasetError, match="clash"):
        write_llava_json([s], tmp_path / "d.json", image_dir=tmp_path / "img")


def test_non_utf8_line_spoils_only_itself(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b'\n{"id": "\xff"}\n' + json.dumps({**GOOD, "id": "z"}).encode())
    report = BadSampleReport()
    assert [s.id for s in read_dataset(path, on_bad_sample="skip", report=report)] == ["good", "z"]
    assert report.entries[0].source == f"{path}:2" and "not UTF-8" in report.entries[0].reason
