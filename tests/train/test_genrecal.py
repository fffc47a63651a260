"""GenRecal on live tiny models: a Qwen2-VL teacher and a Qwen2-VL student with a DIFFERENT tokenizer (other vocab
size and splits), the procedural VQA data with images, the teacher's features computed live here (a fixture: the
feature cache comes later), then the join checks, the identity wiring, per-stage trainable sets and the three
stages end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import _sharpen_head

FAMILY = "qwen2_vl"


class DictFeatures:
    """A FeatureSource over features computed in this test module (what the cache reader will provide)."""

    def __init__(self, fingerprint: dict, items: dict, has_question: bool = True):
        self.teacher_fingerprint, self.items, self.has_question = fingerprint, items, has_question

    def get(self, sample_id):
        return self.items[sample_id]


def _set_norm_eps(model_dir: Path, eps: float) -> None:
    import json

    f = model_dir / "config.json"
    cfg = json.loads(f.read_text())
    cfg.setdefault("text_config", {})["rms_norm_eps"] = eps
    if "rms_norm_eps" in cfg:
        cfg["rms_norm_eps"] = eps
    f.write_text(json.dumps(cfg, indent=2))


def _live_features(teacher, data) -> DictFeatures:
    """The teacher's post-final-norm states at its answer and question rows, one sample at a time."""
    from vlsi.models.encoding import collate, encode_sample, pad_id_of
    from vlsi.train.genrecal_data import TeacherFeatures, question_rows

    items = {}
    with torch.no_grad():
        for i in range(len(data)):
            s = data[i]
            enc = encode_sample(s, teacher.bundle)
            hid = teacher.forward_hidden(collate([enc], pad_id_of(teacher.tokenizer)), [], rows="all")
            ap = enc.answer_positions
            q = torch.from_numpy(question_rows(ap.numpy(), enc.length))
            items[s.id] = TeacherFeatures(s.id, s.content_hash, enc.input_ids, ap, enc.input_ids[ap + 1],
                                          hid.final_hidden[ap].clone(), hid.final_hidden[q].clone())
    return DictFeatures(teacher.fingerprint(), items)


@pytest.fixture(scope="module")
def gr(tmp_path_factory):
    from vlsi.demo.tiny import build_tokenizer, default_corpus, write_tiny_model
    from vlsi.demo.vqa import generate_vqa
    from vlsi.models.adapter import load_model
    from vlsi.models.dataset import open_dataset

    root = tmp_path_factory.mktemp("genrecal")
    tok_t = build_tokenizer(family=FAMILY)  # the demo corpus, 700 entries
    # another BPE: fewer entries, learnt on the corpus written backwards, so other merges, ids and splits
    tok_s = build_tokenizer([t[::-1] for t in default_corpus()], vocab_size=420, family=FAMILY)
    teacher = write_tiny_model(root / "teacher", FAMILY, tokenizer=tok_t, size="test", seed=1)
    student = write_tiny_model(root / "student", FAMILY, tokenizer=tok_s, size="test", seed=2)
    _set_norm_eps(teacher, 1e-12)  # the identity test's exactness (see there)
    _sharpen_head(teacher, 40.0)  # a peaked teacher: a random tiny model is near-uniform and every KL ~ 0
    splits = generate_vqa(root / "data", n_train=16, n_val=8, n_test=2, seed=0, image_size=56)
    t = load_model(teacher, device="cpu")
    feats = {k: _live_features(t, open_dataset(splits[k])) for k in ("train", "val")}
    return {"root": root, "tok_t": tok_t, "tok_s": tok_s, "teacher": teacher, "student": student,
            "train": splits["train"], "val": splits["val"], "test": splits["test"], "features": feats}


def _cfg(gr, out, **kw):
    from vlsi.train.config import TrainConfig

    base = dict(method="genrecal", student=str(gr["student"]), teacher_head=str(gr["teacher"]),
                data=str(gr["train"]), out=str(out), steps=2, batch_size=4, lr=1e-3, min_lr=1e-4, lora_rank=4,
                device="cpu", progress=False, chunk_tokens=7, max_grad_norm=None)
    base.update(kw)
    return TrainConfig(**base)


def _float64_batch(gr, *, need_question: bool):
    """Student, teacher head and a seeded Recalibrator in float64, and a collated batch of 3 training samples (the
    features cast to float64; question features kept only when ``need_question``), with its dataset."""
    import dataclasses

    from vlsi.models.adapter import load_model
    from vlsi.models.dataset import open_dataset
    from vlsi.models.encoding import pad_id_of
    from vlsi.models.head_only import load_head_only
    from vlsi.train.genrecal import build_recalibrator
    from vlsi.train.genrecal_data import FeatureBatch, GenRecalDataset
    from vlsi.train.join import collate_joined

    student = load_model(gr["student"], device="cpu")
    student.model.double()
    head = load_head_only(gr["teacher"], device="cpu")
    rec = build_recalibrator(student, head, _cfg(gr, "unused")).double()
    ds = GenRecalDataset(open_dataset(gr["train"]), gr["features"]["train"], student.bundle, head.tokenizer,
                         d_teacher=32, need_question=need_question)
    batch, feats, _ = collate_joined([ds[i] for i in range(3)], pad_id_of(student.tokenizer))
    feats = FeatureBatch([dataclasses.replace(f, z_answer=f.z_answer.double(),
                                              z_question=f.z_question.double() if need_question else None)
                          for f in feats.items])
    return student, head, rec, ds, batch, feats


def test_the_pair_really_has_different_tokenizers(gr):
    tok_t, tok_s = gr["tok_t"], gr["tok_s"]
    assert len(tok_t) != len(tok_s)
    text = "The red square is left of the blue circle."
    assert tok_t(text)["input_ids"] != tok_s(text)["input_ids"]
    assert len(tok_t(text)["input_ids"]) != len(tok_s(text)["input_ids"])


# ---- the join's checks -----------------------------------------------------------------------------------------
def test_check_teacher_features_accepts_and_refuses(gr):
    import dataclasses

    from vlsi.models.dataset import open_dataset
    from vlsi.models.errors import BadSampleError
    from vlsi.train.genrecal_data import check_teacher_features

    data = open_dataset(gr["train"])
    src = gr["features"]["train"]
    s0, s1 = data[0], data[1]
    f0 = src.get(s0.id)
    kw = dict(d_teacher=32, need_question=True)
    check_teacher_features(s0, f0, gr["tok_t"], **kw)
    with pytest.raises(BadSampleError, match="content_hash"):
        check_teacher_features(s0, dataclasses.replace(f0, content_hash="0" * 64), gr["tok_t"], **kw)
    other = src.get(s1.id)  # another sample's teacher ids under this sample's hash
    assert s0.turns[-1].text != s1.turns[-1].text
    with pytest.raises(BadSampleError, match="decode to"):
        check_teacher_features(s0, dataclasses.replace(other, content_hash=s0.content_hash), gr["tok_t"], **kw)
    with pytest.raises(BadSampleError, match="decode to"):  # the student's tokenizer cannot read teacher ids
        check_teacher_features(s0, f0, gr["tok_s"], **kw)
    with pytest.raises(BadSampleError, match="z_answer"):
        check_teacher_features(s0, dataclasses.replace(f0, z_answer=f0.z_answer[:-1]), gr["tok_t"], **kw)
    with pytest.raises(BadSampleError, match="question"):
        check_teacher_features(s0, dataclasses.replace(f0, z_question=None), gr["tok_t"], **kw)
    check_teacher_features(s0, dataclasses.replace(f0, z_question=None), gr["tok_t"], d_teacher=32,
                           need_question=False)


def test_check_teacher_head_names_the_fields(gr):
    from vlsi.models.head_only import load_head_only
    from vlsi.train.genrecal_data import check_teacher_head
    from vlsi.train.join import JoinError

    fp = gr["features"]["train"].teacher_fingerprint
    check_teacher_head(fp, load_head_only(gr["teacher"], device="cpu").fingerprint())
    with pytest.raises(JoinError, match="tokenizer_hash") as e:
        check_teacher_head(fp, load_head_only(gr["student"], device="cpu").fingerprint())
    assert "vocab_size" in str(e.value) and "\n" not in str(e.value)


def test_vlsi_refusal_of_another_tokenizer_points_to_genrecal(gr):
    from vlsi.train.join import JoinError, check_student_fingerprint

    class Reader:
        fingerprint = type("F", (), {"tokenizer_hash": "x" * 64, "vocab_size": len(gr["tok_t"])})()

    with pytest.raises(JoinError, match="--method genrecal"):
        check_student_fingerprint(Reader(), gr["tok_s"], url="CACHE")


def test_cache_without_features_is_refused_in_one_line(gr, tmp_path):
    from vlsi.common.errors import VlsiError
    from vlsi.train.recipe import run

    with pytest.raises(VlsiError, match="need teacher features: --cache CACHE"):
        run(_cfg(gr, tmp_path / "o1"))
    golden = Path(__file__).parents[1] / "cache_format" / "golden" / "v1_1"
    cache = golden  # a top-k cache (format 1.1): no features
    with pytest.raises(VlsiError, match=r"cache format 1\.1 holds no teacher hidden-state features") as e:
        run(_cfg(gr, tmp_path / "o2", cache=str(cache)))
    assert "\n" not in str(e.value)


# ---- identity wiring ---------------------------------------------------------------------------------------------
def test_identity_recalibrator_reproduces_the_teachers_distribution(gr):
    """Teacher-only input through an identity-initialised Recalibrator (rmsnorm: exact) gives the teacher's own
    post-norm states at the answer rows, hence its distribution: KL ~ 0 and the teacher's own CE."""
    from vlsi.models.adapter import load_model
    from vlsi.models.head_only import load_head_only
    from vlsi.train.genrecal import build_recalibrator
    from vlsi.train.genrecal_losses import head_ce_kl

    head = load_head_only(gr["teacher"], device="cpu")
    student = load_model(gr["student"], device="cpu")
    rec = build_recalibrator(student, head, _cfg(gr, "unused", rec_init="identity", rec_norm="rmsnorm"))
    # float64 math. Exact but for one term: the teacher's own norm eps makes rms(z / g) = 1 - d with
    # d = eps_T / (2 rms(h)^2), and the Recalibrator's norm restores rms 1 (rows z * (1 + d)). Real teachers have
    # rms(h) >> 1 (d ~ 1e-9); a tiny random one has rms(h)^2 ~ 2e-4 (d = 2e-3 at eps 1e-6), hence the fixture's
    # teacher eps of 1e-12.
    rec = rec.double().eval()
    w = head.lm_head.weight.double()
    worst = 0.0
    with torch.no_grad():
        for f in list(gr["features"]["val"].items.values())[:4]:
            za, zq = f.z_answer.double(), f.z_question.double()
            r = rec.answer_rows([rec.pre(zq)], [rec.pre(za)])
            worst = max(worst, float(((r - za).norm(dim=1) / za.norm(dim=1)).max()))
            ce, kl = head_ce_kl(r, za, w, f.answer_ids, real_vocab=head.vocab_size)
            ce_t, _ = head_ce_kl(za, za, w, f.answer_ids, real_vocab=head.vocab_size)
            assert float(kl.abs().max()) < 1e-7
            torch.testing.assert_close(ce, ce_t, rtol=1e-6, atol=1e-6)
        assert worst < 1e-6
        # and it is a real test: a random Recalibrator is far from the teacher
        rnd = build_recalibrator(student, head, _cfg(gr, "unused"))
        f = next(iter(gr["features"]["val"].items.values()))
        r = rnd.answer_rows([rnd.pre(f.z_question)], [rnd.pre(f.z_answer)])
        _, kl = head_ce_kl(r, f.z_answer, head.lm_head.weight, f.answer_ids, real_vocab=head.vocab_size)
        assert float(kl.mean()) > 0.1


# ---- only the intended parameters train -------------------------------------------------------------------------
def _snapshot(*modules):
    return {f"{i}.{n}": p.detach().clone() for i, m in enumerate(modules) for n, p in m.named_parameters()}


def test_each_stage_trains_only_its_parameters(gr, tmp_path):
    from vlsi.models.adapter import load_model
    from vlsi.models.dataset import open_dataset
    from vlsi.models.head_only import load_head_only
    from vlsi.train.engine import Engine, LoopSettings
    from vlsi.train.genrecal import build_recalibrator
    from vlsi.train.genrecal_data import GenRecalDataset
    from vlsi.train.genrecal_stages import GenRecalInputs
    from vlsi.train.recipe import _trainable_student
    from vlsi.train.stages import STAGES, StageInputs

    cfg = _cfg(gr, tmp_path)
    student = load_model(gr["student"], device="cpu")
    head = load_head_only(gr["teacher"], device="cpu")
    rec = build_recalibrator(student, head, cfg)
    data = open_dataset(gr["train"])
    ds = GenRecalDataset(data, gr["features"]["train"], student.bundle, head.tokenizer, d_teacher=32,
                         need_question=True)
    state = {}

    def trainable():
        if "m" not in state:
            state["m"] = [("model", _trainable_student(student, cfg))]
        return state["m"]

    x = StageInputs(student, data, cfg, trainable=trainable, genrecal=GenRecalInputs(rec, head, lambda: ds))
    s = LoopSettings(batch_size=4, grad_accum=1, lr=1e-2, min_lr=1e-3, warmup_steps=0, weight_decay=0.0,
                     max_grad_norm=None, seed=0, progress=False)
    (tmp_path / "run").mkdir()
    engine = Engine(tmp_path / "run", s, device=torch.device("cpu"), pad_id=student.tokenizer.pad_token_id)
    head_before = head.lm_head.weight.detach().clone()

    def names(stage):
        return {f"{pre}.{n}" for pre, m in stage.modules for n, p in m.named_parameters() if p.requires_grad}

    for name, want_rec, want_lora in (("recalibrate", True, False), ("joint", True, True), ("sft", False, True)):
        stage = STAGES[name](x)
        trained = names(stage)
        assert any(n.startswith("recalibrator.") for n in trained) == want_rec, name
        assert any("lora_" in n for n in trained) == want_lora, name
        assert all(n.startswith("recalibrator.") or "lora_" in n for n in trained), name
        assert not any("visual" in n for n in trained), name
        before = _snapshot(rec, student.model)
        engine.run(stage, 1)
        after = _snapshot(rec, student.model)
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert any(k.startswith("0.") for k in changed) == want_rec, (name, sorted(changed)[:5])
        assert any(k.startswith("1.") for k in changed) == want_lora, (name, sorted(changed)[:5])
        assert all(k.startswith("0.") or "lora_" in k for k in changed), (name, sorted(changed)[:5])
    assert torch.equal(head.lm_head.weight, head_before)


# ---- end to end ---------------------------------------------------------------------------------------------------
def test_stage1_lowers_held_out_kl_then_three_stages_export_a_model_that_generates(gr, tmp_path):
    from safetensors.torch import load_file

    from vlsi.eval.generate import generate_ids
    from vlsi.models.adapter import load_model
    from vlsi.models.dataset import open_dataset
    from vlsi.models.head_only import load_head_only
    from vlsi.train.genrecal import build_recalibrator, evaluate_recalibrator, run_genrecal
    from vlsi.train.genrecal_data import GenRecalDataset

    cfg = _cfg(gr, tmp_path / "run", recalibrate_steps=40, joint_steps=4, sft_steps=4, lr=3e-3, min_lr=3e-4)
    student = load_model(gr["student"], device="cpu")
    head = load_head_only(gr["teacher"], device="cpu")
    val = GenRecalDataset(open_dataset(gr["val"]), gr["features"]["val"], student.bundle, head.tokenizer,
                          d_teacher=32, need_question=True)
    before = evaluate_recalibrator(build_recalibrator(student, head, cfg), student, head, val)

    s1 = run_genrecal(_cfg(gr, tmp_path / "s1", stages=("recalibrate",), recalibrate_steps=40, lr=3e-3,
                           min_lr=3e-4), features=gr["features"]["train"])
    assert s1["finished"]
    rec = build_recalibrator(student, head, cfg)
    rec.load_state_dict(load_file(str(tmp_path / "s1" / "recalibrator" / "recalibrator.safetensors")))
    after = evaluate_recalibrator(rec, student, head, val)
    assert after["rows"] == before["rows"] > 0
    assert after["kl"] < 0.7 * before["kl"], (before, after)

    summary = run_genrecal(cfg, features=gr["features"]["train"])
    assert summary["finished"] and list(summary["stages"]) == ["recalibrate", "joint", "sft"]
    final = Path(summary["final"])
    assert (final / "config.json").is_file() and (final / "vlsi_train.json").is_file()
    model = load_model(final, device="cpu")
    assert len(model.tokenizer) == len(gr["tok_s"])
    sample = open_dataset(gr["test"])[0]
    from vlsi.eval.prompting import encode_prompt

    out = generate_ids(model, [encode_prompt(sample, model)], max_new_tokens=4)
    assert len(out) == 1 and len(out[0][0]) >= 1


# ---- config and command line -------------------------------------------------------------------------------------
def test_config_method_stages_and_teacher_head(tmp_path):
    from vlsi.common.config import ConfigError
    from vlsi.train.config import TrainConfig

    base = dict(student="s", data="d.json", out=str(tmp_path / "o"))
    assert TrainConfig(**base, cache="c").stages == ("verbalize", "interact", "sft")
    g = TrainConfig(**base, method="genrecal", teacher_head="t")
    assert g.stages == ("recalibrate", "joint", "sft") and g.stage_steps("joint") is None
    assert TrainConfig(**base, method="genrecal", stages=("sft",)).teacher_head is None  # sft alone needs no head
    with pytest.raises(ConfigError, match="--teacher-head"):
        TrainConfig(**base, method="genrecal")
    with pytest.raises(ConfigError, match="those are --method genrecal's"):
        TrainConfig(**base, stages=("recalibrate",))
    with pytest.raises(ConfigError, match="not in recalibrate,joint,sft of --method genrecal"):
        TrainConfig(**base, method="genrecal", teacher_head="t", stages=("interact",))
    with pytest.raises(ConfigError, match="order"):
        TrainConfig(**base, method="genrecal", teacher_head="t", stages=("joint", "recalibrate"))


def test_cli_help_and_one_line_refusal(gr, tmp_path):
    from click.testing import CliRunner

    from vlsi.train.cli import main

    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0
    for word in ("--method", "--teacher-head", "genrecal", "--rec-blocks", "--genrecal-reg"):
        assert word in r.output
    golden = Path(__file__).parents[1] / "cache_format" / "golden" / "v1_1"
    r = CliRunner().invoke(main, ["--method", "genrecal", "--cache", str(golden), "--teacher-head", str(gr["teacher"]),
                                  "--student", str(gr["student"]), "--data", str(gr["train"]), "--out",
                                  str(tmp_path / "o"), "--device", "cpu"])
    assert r.exit_code == 2
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--hidden-states" in lines[0], r.output


def test_question_rows():
    from vlsi.train.genrecal_data import question_rows

    assert question_rows([3, 4, 5], 8).tolist() == [0, 1, 2]
    assert question_rows([2, 3, 6, 7], 9).tolist() == [0, 1, 4, 5]  # a second turn's prompt rows
    assert question_rows([], 4).tolist() == []
    with pytest.raises(ValueError, match="outside"):
        question_rows([9], 5)


def test_interrupted_run_resumes_to_the_same_weights(gr, tmp_path, monkeypatch):
    """Stopped inside the joint stage, or killed between recalibrate and joint, then resumed in a new call: the
    Recalibrator (carried over from the finished stage) and the student end exactly as in one uninterrupted run."""
    from safetensors.torch import load_file

    from vlsi.train.engine import Engine
    from vlsi.train.genrecal import run_genrecal

    kw = dict(recalibrate_steps=2, joint_steps=3, sft_steps=2)
    one = run_genrecal(_cfg(gr, tmp_path / "one", **kw), features=gr["features"]["train"])
    part = run_genrecal(_cfg(gr, tmp_path / "two", stop_after=2, **kw), features=gr["features"]["train"])
    assert part["finished"] is False and part["stages"]["joint"]["step"] == 2
    two = run_genrecal(_cfg(gr, tmp_path / "two", resume=True, **kw), features=gr["features"]["train"])
    assert one["finished"] and two["finished"]
    real_run = Engine.run

    def killed_at_joint(self, stage, total):
        if stage.name == "joint":
            raise KeyboardInterrupt("killed between stages")
        return real_run(self, stage, total)

    monkeypatch.setattr(Engine, "run", killed_at_joint)
    with pytest.raises(KeyboardInterrupt):
        run_genrecal(_cfg(gr, tmp_path / "three", **kw), features=gr["features"]["train"])
    monkeypatch.setattr(Engine, "run", real_run)
    three = run_genrecal(_cfg(gr, tmp_path / "three", resume=True, **kw), features=gr["features"]["train"])
    assert three["finished"] and "recalibrate" not in three["stages"]  # done before the kill: not rerun
    for other in ("two", "three"):
        for rel in ("recalibrator/recalibrator.safetensors", "final/model.safetensors"):
            a, b = load_file(str(tmp_path / "one" / rel)), load_file(str(tmp_path / other / rel))
            assert set(a) == set(b)
            for k in a:
                assert torch.equal(a[k], b[k]), (other, rel, k)


def test_stage_loss_is_the_method_written_out_in_float64(gr):
    """The recalibrate stage's loss (main pass + regulariser) equals the method computed densely here, in float64,
    in value and in gradient wrt every Recalibrator parameter."""
    from vlsi.models.encoding import pad_id_of
    from vlsi.train.genrecal_data import question_rows
    from vlsi.train.genrecal_stages import RecalibrateStage
    from vlsi.train.join import collate_joined

    student, head, rec, ds, batch, feats = _float64_batch(gr, need_question=True)
    n_norm = 11
    stage = RecalibrateStage(student, rec, head, [("recalibrator", rec)], ds, reg_weight=0.5, ce_weight=0.7,
                             kl_weight=1.3, chunk_tokens=3)
    loss, m = stage.loss_step(batch, feats, n_norm, 0)
    got = torch.autograd.grad(loss, list(rec.parameters()))

    w = head.lm_head.weight.double()[: head.vocab_size]
    ref = 0.0
    for b, f in enumerate(feats.items):  # one sample at a time, no padding, dense logits
        enc = ds[b][0]
        with torch.no_grad():  # the student alone, unpadded
            hid = student.forward_hidden(collate_joined([ds[b]], pad_id_of(student.tokenizer))[0], [], rows="all")
        z_s = hid.final_hidden
        q = torch.from_numpy(question_rows(enc.answer_positions.numpy(), enc.length))
        p_t = torch.log_softmax(f.z_answer @ w.T, dim=1)
        for qs, weight in ((z_s[q], 1.0), (rec.pre(f.z_question), 0.5)):
            x = torch.cat([qs, rec.pre(f.z_answer)])[None]
            h = rec.blocks(inputs_embeds=x, position_ids=torch.arange(x.shape[1])[None], use_cache=False)
            r = rec.norm(rec.post(h.last_hidden_state[0]))[qs.shape[0]:]
            log_q = torch.log_softmax(r @ w.T, dim=1)
            ce = -log_q[torch.arange(len(f.answer_ids)), f.answer_ids].sum()
            kl = (p_t.exp() * (p_t - log_q)).sum()
            ref = ref + weight * (0.7 * ce + 1.3 * kl)
    ref = ref / n_norm
    want = torch.autograd.grad(ref, list(rec.parameters()))
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-9)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-7, atol=1e-10)
    assert m.sums["reg_kl"] > 0 and m.sums["rec_kl"] > 0


def test_stage_with_bf16_features_under_bf16_autocast(gr):
    """Features stored as bf16 (the cache's planned dtype) through the stage under CPU bf16 autocast: finite, and
    within bf16 rounding of the fp32 loss; gradients reach the Recalibrator in its fp32 master dtype."""
    import dataclasses

    from vlsi.models.adapter import load_model
    from vlsi.models.dataset import open_dataset
    from vlsi.models.encoding import pad_id_of
    from vlsi.models.head_only import load_head_only
    from vlsi.train.genrecal import build_recalibrator
    from vlsi.train.genrecal_data import FeatureBatch, GenRecalDataset
    from vlsi.train.genrecal_stages import RecalibrateStage
    from vlsi.train.join import collate_joined

    student = load_model(gr["student"], device="cpu")
    head = load_head_only(gr["teacher"], device="cpu")
    rec = build_recalibrator(student, head, _cfg(gr, "unused"))
    ds = GenRecalDataset(open_dataset(gr["train"]), gr["features"]["train"], student.bundle, head.tokenizer,
                         d_teacher=32, need_question=True)
    batch, feats, _ = collate_joined([ds[i] for i in range(4)], pad_id_of(student.tokenizer))
    stage = RecalibrateStage(student, rec, head, [("recalibrator", rec)], ds, reg_weight=1.0, ce_weight=1.0,
                             kl_weight=1.0, chunk_tokens=5)
    ref, _ = stage.loss_step(batch, feats, 10, 0)
    low = FeatureBatch([dataclasses.replace(f, z_answer=f.z_answer.bfloat16(), z_question=f.z_question.bfloat16())
                        for f in feats.items])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = stage.loss_step(batch, low, 10, 0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    a, b = float(loss.detach()), float(ref.detach())
    assert abs(a - b) < 0.05 * abs(b), (a, b)
    loss.backward()
    grads = [p.grad for p in rec.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


# ---- from a feature cache, end to end ----------------------------------------------------------------------------
def _extract(gr, split, out, kind="all"):
    from click.testing import CliRunner

    from vlsi.extract.cli import main

    r = CliRunner().invoke(main, ["--teacher", str(gr["teacher"]), "--data", str(gr[split]), "--out", str(out),
                                  "--hidden-states", kind, "--top-k", "4", "--batch-size", "8", "--no-progress",
                                  "--device", "cpu"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return str(out)


@pytest.fixture(scope="module")
def feature_caches(gr):
    return {split: _extract(gr, split, gr["root"] / f"cache-{split}") for split in ("train", "val")}


def test_cache_features_are_the_live_ones_and_pass_the_join(gr, feature_caches):
    from vlsi.cache_format import open_cache
    from vlsi.models.dataset import open_dataset
    from vlsi.train.genrecal_data import CacheFeatures, check_teacher_features

    src = CacheFeatures(open_cache(feature_caches["train"]))
    live = gr["features"]["train"]
    assert src.has_question and isinstance(src.teacher_fingerprint, dict)
    data = open_dataset(gr["train"])
    for i in range(len(data)):
        s = data[i]
        f, g = src.get(s.id), live.get(s.id)
        assert f.z_answer.dtype == torch.bfloat16
        assert torch.equal(f.input_ids, g.input_ids.long()) and torch.equal(f.answer_ids, g.answer_ids.long())
        torch.testing.assert_close(f.z_answer.float(), g.z_answer.float(), rtol=1e-2, atol=1e-2 * float(g.z_answer.abs().max()))
        torch.testing.assert_close(f.z_question.float(), g.z_question.float(), rtol=1e-2,
                                   atol=1e-2 * float(g.z_question.abs().max()))
        check_teacher_features(s, f, gr["tok_t"], d_teacher=32, need_question=True)
    with pytest.raises(KeyError):
        src.get("no-such-sample")


def test_teacher_head_must_match_the_cache_and_topk_caches_are_refused(gr, feature_caches, tmp_path):
    from vlsi.common.errors import VlsiError
    from vlsi.train.recipe import run

    with pytest.raises(VlsiError, match="--teacher-head is not the teacher") as e:
        run(_cfg(gr, tmp_path / "o", cache=feature_caches["train"], teacher_head=str(gr["student"])))
    assert "tokenizer_hash" in str(e.value) and "vocab_size" in str(e.value) and "\n" not in str(e.value)
    ans = _extract(gr, "val", tmp_path / "answer-only", kind="answer")
    with pytest.raises(VlsiError, match="--hidden-states all, or pass --genrecal-reg-rows answer or --genrecal-reg 0"):
        run(_cfg(gr, tmp_path / "o2", cache=ans))
    # the regulariser on answer rows only needs no question features: an answer cache trains
    out = run(_cfg(gr, tmp_path / "o3", cache=ans, data=str(gr["val"]), stages=("recalibrate",),
                   genrecal_reg_rows="answer"))
    assert out["finished"] and out["stages"]["recalibrate"]["step"] == 2


def test_extract_then_train_three_stages_then_eval(gr, feature_caches, tmp_path):
    """vlsi-extract --hidden-states all -> vlsi-train --method genrecal --cache (recalibrate, joint, sft) ->
    ODIR/final loads and generates -> vlsi-eval runs on it; stage 1 alone lowers the held-out KL (val cache)."""
    import json

    from click.testing import CliRunner
    from safetensors.torch import load_file

    from vlsi.cache_format import open_cache
    from vlsi.eval.cli import main as eval_main
    from vlsi.models.adapter import load_model
    from vlsi.models.dataset import open_dataset
    from vlsi.models.head_only import load_head_only
    from vlsi.train.cli import main as train_main
    from vlsi.train.genrecal import build_recalibrator, evaluate_recalibrator, run_genrecal
    from vlsi.train.genrecal_data import CacheFeatures, GenRecalDataset

    student = load_model(gr["student"], device="cpu")
    head = load_head_only(gr["teacher"], device="cpu")
    val = GenRecalDataset(open_dataset(gr["val"]), CacheFeatures(open_cache(feature_caches["val"])), student.bundle,
                          head.tokenizer, d_teacher=32, need_question=True)
    cfg1 = _cfg(gr, tmp_path / "s1", cache=feature_caches["train"], stages=("recalibrate",), recalibrate_steps=40,
                lr=3e-3, min_lr=3e-4)
    before = evaluate_recalibrator(build_recalibrator(student, head, cfg1), student, head, val)
    assert run_genrecal(cfg1)["finished"]
    rec = build_recalibrator(student, head, cfg1)
    rec.load_state_dict(load_file(str(tmp_path / "s1" / "recalibrator" / "recalibrator.safetensors")))
    after = evaluate_recalibrator(rec, student, head, val)
    assert after["rows"] == before["rows"] > 0
    assert after["kl"] < 0.7 * before["kl"], (before, after)

    odir = tmp_path / "run"
    r = CliRunner().invoke(train_main, [
        "--method", "genrecal", "--cache", feature_caches["train"], "--teacher-head", str(gr["teacher"]),
        "--student", str(gr["student"]), "--data", str(gr["train"]), "--out", str(odir),
        "--stages", "recalibrate,joint,sft", "--recalibrate-steps", "6", "--joint-steps", "3", "--sft-steps", "3",
        "--batch-size", "4", "--lr", "1e-3", "--min-lr", "1e-4", "--lora-rank", "4", "--device", "cpu",
        "--no-progress"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    summary = json.loads((odir / "summary.json").read_text())
    assert summary["finished"] and sorted(summary["stages"]) == ["joint", "recalibrate", "sft"]
    final = odir / "final"
    model = load_model(final, device="cpu")
    assert len(model.tokenizer) == len(gr["tok_s"])
    from vlsi.eval.generate import generate_ids
    from vlsi.eval.prompting import encode_prompt

    out = generate_ids(model, [encode_prompt(open_dataset(gr["test"])[0], model)], max_new_tokens=4)
    assert len(out) == 1 and len(out[0][0]) >= 1
    r = CliRunner().invoke(eval_main, ["run", "--model", str(final), "--data", str(gr["test"]), "--device", "cpu",
                                       "--max-new-tokens", "4", "--json", "--out", str(tmp_path / "eval.json")],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res.get("n", res.get("n_samples", len(res.get("predictions", [])))) == 2, sorted(res)


def test_a_head_with_other_weights_but_the_same_fingerprint_is_refused(gr, feature_caches, tmp_path):
    """The fingerprint holds the config, not the weights: the cache's final-head top-k catches another head."""
    import shutil

    from vlsi.cache_format import open_cache
    from vlsi.models.head_only import load_head_only
    from vlsi.train.genrecal_data import CacheFeatures, check_teacher_head
    from vlsi.train.join import JoinError

    src = CacheFeatures(open_cache(feature_caches["train"]))
    assert src.check_head(load_head_only(gr["teacher"], device="cpu")) < 0.05
    other = tmp_path / "elsewhere" / gr["teacher"].name
    shutil.copytree(gr["teacher"], other)
    _sharpen_head(other, 1.5)  # same config, tokenizer and name: only the weights differ
    head = load_head_only(other, device="cpu")
    check_teacher_head(src.teacher_fingerprint, head.fingerprint())  # the fingerprint cannot tell
    with pytest.raises(JoinError, match="not the head the cache was extracted with") as e:
        src.check_head(head)
    assert "\n" not in str(e.value)


def test_regulariser_on_answer_rows_is_the_teacher_answer_rows_alone(gr):
    """--genrecal-reg-rows answer: the regulariser's terms are CE/KL of Rec(pre(z_T answer)), no question part,
    written out here sample by sample in float64; question features are then not needed."""

    from vlsi.train.genrecal_losses import head_ce_kl
    from vlsi.train.genrecal_stages import RecalibrateStage

    student, head, rec, ds, batch, feats = _float64_batch(gr, need_question=False)
    stage = RecalibrateStage(student, rec, head, [("recalibrator", rec)], ds, reg_weight=1.0, ce_weight=1.0,
                             kl_weight=1.0, chunk_tokens=4, reg_rows="answer")
    _, m = stage.loss_step(batch, feats, 1, 0)
    w = head.lm_head.weight.double()
    ce_ref = kl_ref = 0.0
    with torch.no_grad():
        for f in feats.items:
            x = rec.pre(f.z_answer)[None]
            h = rec.blocks(inputs_embeds=x, position_ids=torch.arange(x.shape[1])[None], use_cache=False)
            r = rec.norm(rec.post(h.last_hidden_state[0]))
            ce, kl = head_ce_kl(r, f.z_answer, w, f.answer_ids, real_vocab=head.vocab_size)
            ce_ref, kl_ref = ce_ref + float(ce.sum()), kl_ref + float(kl.sum())
    assert abs(float(m.sums["reg_kl"]) - kl_ref) < 1e-8 * max(1.0, kl_ref) and kl_ref > 0
    assert abs(float(m.sums["reg_ce"]) - ce_ref) < 1e-8 * max(1.0, ce_ref)
    assert abs(float(m.sums["reg_kl"]) - float(m.sums["rec_kl"])) > 1e-6  # not the main pass
