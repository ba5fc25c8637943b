"""Real data: trained BPE tokenizers, bits per byte, pre-tokenized shards, the packages and
Hugging Face sources, grain workers and exact resume, and the refusals that keep different
texts and tokenizers from being fitted together by accident."""

import dataclasses
import hashlib
import json
import math
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest

import experiments
from scaling import runs
from scaling.cli import main
from scaling.config import ConfigError, DataConfig
from scaling.data import corpus, loader, shards, sources, tokenize
from scaling.errors import SchemaError, UsageError
from scaling.files import read_jsonl
from scaling.train import loop
from scaling.train.loop import WALL_FIELDS

TINY = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "data.seq_len=32", "data.batch_size=8",
        "data.eval_tokens=2048", "log_every=5", "eval_every=10", "progress=false"]


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    """~50 real text files (a few stdlib packages' sources), copied so the test owns them."""
    root = tmp_path_factory.mktemp("text")
    std = Path(sysconfig.get_paths()["stdlib"])
    for pkg in ("json", "html", "urllib", "wsgiref"):
        for f in sorted((std / pkg).glob("*.py")):
            dst = root / pkg / f.name
            dst.parent.mkdir(exist_ok=True)
            shutil.copyfile(f, dst)
    (root / "notes.md").write_text("# Notes\n\nnaïve café — ünïcödé text, 日本語 too.\n" * 20)
    return root


@pytest.fixture(scope="module")
def small_bpe(tmp_path_factory, text_dir):
    out = tmp_path_factory.mktemp("tok") / "bpe512"
    docs = sources.documents(DataConfig(source="local_text", path=str(text_dir)))
    tokenize.train_bpe(docs.train(), 512, out, {"source": "local_text"})
    return out


def test_bpe_on_stdlib_round_trips_every_held_out_file_and_counts_its_bytes(tmp_path, capsys):
    """The acceptance tokenizer: 4K BPE trained on the stdlib by the CLI; every held-out file
    decodes to itself byte for byte, and the per-id byte table sums to the file's size (what
    bits per byte divide by)."""
    out = tmp_path / "tok"
    assert main(["data", "tokenizer", "train", "--vocab", "4096", "--source", "stdlib", "--out", str(out)]) == 0
    meta = json.loads((out / tokenize.BPE_META).read_text())
    assert meta["vocab_size"] == 4096 and meta["sha256"] == hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()
    tok = tokenize.get_tokenizer(f"bpe:{out}")
    assert tok.vocab_size == 4096 and tok.separator == 0 and tokenize.fingerprint(tok) == meta["sha256"]
    table = tok.token_bytes()
    held = list(sources.documents(DataConfig()).validation())
    assert len(held) >= 10
    n_bytes = n_tokens = 0
    for doc in held:
        ids = tok.encode(doc)
        assert tok.decode(ids).encode("utf-8") == doc
        assert int(table[ids].sum()) == len(doc)
        n_bytes, n_tokens = n_bytes + len(doc), n_tokens + ids.size
    assert 2.5 < n_bytes / n_tokens < 5  # a subword tokenizer, not bytes in disguise
    # never overwritten: a second train into the same directory is one line, exit 2
    capsys.readouterr()
    assert main(["data", "tokenizer", "train", "--vocab", "512", "--out", str(out)]) == 2
    assert "already holds a tokenizer" in capsys.readouterr().err
    assert tokenize.fingerprint(tokenize.get_tokenizer(f"bpe:{out}")) == meta["sha256"]


def test_bpe_training_is_deterministic_and_unicode_round_trips(tmp_path, text_dir, small_bpe):
    docs = sources.documents(DataConfig(source="local_text", path=str(text_dir)))
    again = tmp_path / "again"
    tokenize.train_bpe(docs.train(), 512, again, {"source": "local_text"})
    assert (again / "tokenizer.json").read_bytes() == (small_bpe / "tokenizer.json").read_bytes()
    tok = tokenize.get_tokenizer(f"bpe:{small_bpe}")
    text = (text_dir / "notes.md").read_bytes()
    ids = tok.encode(text)
    assert tok.decode(ids).encode() == text and int(tok.token_bytes()[ids].sum()) == len(text)


def test_stdlib_bytes_from_shards_serve_the_same_tokens_in_the_same_order(tmp_path):
    """Shards are a storage change only: for the stdlib at byte level the content hash, every
    training batch and the held-out set equal the in-memory path's (which is unchanged)."""
    out = tmp_path / "shards"
    m = shards.prepare(DataConfig(), out, log=lambda s: None)
    ram, disk = DataConfig(batch_size=8, seq_len=64), DataConfig(source="shards", path=str(out), batch_size=8, seq_len=64)
    info_ram, info_disk = corpus.corpus_info(ram), corpus.corpus_info(disk)
    assert m["content_sha256"] == info_ram["sha256"] == info_disk["sha256"]
    assert info_ram["text_sha256"] == info_disk["text_sha256"] == m["text_sha256"]
    for k in ("n_train_tokens", "n_eval_tokens", "n_train_bytes", "windows_per_epoch", "vocab_size"):
        assert info_ram[k] == info_disk[k], k
    assert info_ram["unigram_entropy_nats"] == pytest.approx(info_disk["unigram_entropy_nats"], rel=1e-12)
    a, b = loader.make_train_iterator(ram, seed=3), loader.make_train_iterator(disk, seed=3)
    for _ in range(4):
        x, y = next(a), next(b)
        assert np.array_equal(x["inputs"], y["inputs"]) and np.array_equal(x["targets"], y["targets"])
    assert loader.eval_set(ram).sha256 == loader.eval_set(disk).sha256
    # the index ends each document where the separator is
    train = corpus.load(disk).train
    ends = np.load(out / "train.index.npy")
    assert ends[-1] == train.size and np.all(train.read(ends[:50] - 1, 1) == tokenize.SEPARATOR)


def test_shards_refuse_overwrites_and_report_missing_or_short_files(tmp_path, text_dir, small_bpe, capsys):
    out = tmp_path / "sh"
    argv = ["data", "prepare", "local_text", "--path", str(text_dir), "--tokenizer", f"bpe:{small_bpe}",
            "--exclude", "*.md", "--out", str(out)]
    assert main(argv) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["tokenizer"]["vocab_size"] == 512 and m["dtype"] == "<u2"
    assert not any(f["path"].endswith(".md") for f in m["files"])
    assert all(len(f["sha256"]) == 64 for f in m["files"])
    capsys.readouterr()
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err
    shard = out / m["splits"]["train"]["files"][0]["name"]
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ConfigError, match="has .* bytes, not the"):
        shards.read_manifest(out)
    shard.unlink()
    with pytest.raises(ConfigError, match="shard file .* is missing"):
        shards.read_manifest(out)
    assert main(["data", "info", "--source", "shards", "--path", str(tmp_path / "nowhere")]) == 2
    assert "data.path" in capsys.readouterr().err


def test_bits_per_byte_are_nats_over_ln2_at_byte_level_and_count_text_bytes_for_bpe(text_dir, small_bpe):
    b = DataConfig(source="local_text", path=str(text_dir), seq_len=32, eval_tokens=4096)
    t = DataConfig(source="local_text", path=str(text_dir), seq_len=32, eval_tokens=4096, tokenizer=f"bpe:{small_bpe}")
    eb, et = loader.eval_set(b), loader.eval_set(t)
    assert eb.n_bytes == eb.n_tokens and tokenize.bits_per_byte(2.0, eb.bytes_per_token) == pytest.approx(2 / math.log(2))
    tok = tokenize.get_tokenizer(f"bpe:{small_bpe}")
    targets = np.concatenate([c["targets"].ravel() for c in et.chunks])
    seps = int((targets == tok.separator).sum())
    text = "".join(tok.decode(c["targets"][r]) for c in et.chunks for r in range(len(c["targets"])))
    assert et.n_bytes == len(text.replace("<|sep|>", "").encode()) + seps  # each separator counts one byte
    ib, it = corpus.corpus_info(b), corpus.corpus_info(t)
    assert ib["text_sha256"] == it["text_sha256"] and ib["sha256"] != it["sha256"]
    assert ib["n_train_bytes"] == it["n_train_bytes"] == ib["n_train_tokens"]
    assert it["train_bytes_per_token"] > 1.5


def test_packages_corpus_lists_files_with_hashes_and_splits_by_file():
    cfg = DataConfig(source="packages", packages=("pyyaml", "six"))
    docs = sources.documents(cfg)
    assert docs.files and {f["split"] for f in docs.files} == {"train", "validation"}
    paths = [f["path"] for f in docs.files]
    assert paths == sorted(paths) and len({f["sha256"] for f in docs.files}) == len(paths)  # deduplicated
    assert all(f["path"].startswith(("pyyaml/", "six/")) for f in docs.files)
    n_train = sum(1 for _ in docs.train())
    assert n_train == sum(f["split"] == "train" for f in docs.files)
    assert "scaling" not in sources.dependency_closure() and "jax" in sources.dependency_closure()
    with pytest.raises(ConfigError, match="data.packages: 'no-such-dist' is not installed"):
        sources.documents(DataConfig(source="packages", packages=("no-such-dist",)))


def test_worker_processes_serve_the_same_batches_and_resume_from_any_step(tmp_path):
    out = tmp_path / "sh"
    shards.prepare(DataConfig(source="packages", packages=("pyyaml",)), out, log=lambda s: None)
    base = dict(source="shards", path=str(out), batch_size=4, seq_len=32)
    ref_it = loader.make_train_iterator(DataConfig(**base), seed=1)
    ref = [next(ref_it)["inputs"] for _ in range(6)]
    it = loader.make_train_iterator(DataConfig(**base, worker_count=2), seed=1)
    got = [next(it)["inputs"] for _ in range(3)]
    state = it.get_state()
    assert state == {"next_index": 3, "sequences": 3 * base.get("batch_size", DataConfig().batch_size)}
    it.close()
    again = loader.make_train_iterator(DataConfig(**base, worker_count=1), seed=1)
    again.set_state(state)
    got += [next(again)["inputs"] for _ in range(3)]
    again.close()
    assert all(np.array_equal(a, b) for a, b in zip(ref, got))


def _mixed_table(tmp_path, rows):
    for i, r in enumerate(rows):
        d = tmp_path / f"run{i}"
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps({"state": "done", "N": 1e5 * (i + 1), "D": 1e6, "C": 6e11 * (i + 1),
                                                    "final_eval_loss": 2.0 - 0.1 * i, "final_eval_bpb": 1.5 - 0.05 * i,
                                                    "schema_version": 3, **r}))
    return tmp_path


def test_tables_refuse_mixed_texts_and_fits_refuse_nats_of_mixed_tokenizers(tmp_path):
    from scaling.fit import io

    mixed_text = _mixed_table(tmp_path / "a", [{"text_sha256": "aa", "tokenizer_sha256": "t"},
                                               {"text_sha256": "bb", "tokenizer_sha256": "t"}])
    with pytest.raises(SchemaError, match="text_sha256: .* different corpora"):
        runs.load(mixed_text)
    assert len(runs.load(mixed_text, allow_mixed_corpus=True)) == 2
    mixed_tok = _mixed_table(tmp_path / "b", [{"text_sha256": "aa", "tokenizer_sha256": f"t{i}", "tokenizer": f"k{i}"}
                                              for i in range(3)])
    with pytest.raises(UsageError, match="3 tokenizers .* --columns loss=bpb"):
        io.load_table(str(mixed_tok))
    df, _ = io.load_table(str(mixed_tok), columns="loss=bpb")
    assert list(df["loss"]) == pytest.approx([1.5, 1.45, 1.4])
    assert "loss_seed_std" in df and df["loss_seed_std"].isna().all()  # bpb's own spread, not the nats one
    one, _ = io.load_table(str(mixed_tok), where="tokenizer == 'k1'")  # one tokenizer picked: nats are one unit
    assert list(one["loss"]) == pytest.approx([1.9])


@pytest.mark.slow
def test_hf_dataset_trains_and_a_changed_tokenizer_is_refused_on_resume(tmp_path, text_dir, small_bpe, capsys):
    import datasets

    texts = [p.read_text() for p in sorted(text_dir.rglob("*.py"))]
    saved = tmp_path / "hf_saved"
    datasets.Dataset.from_dict({"content": texts}).save_to_disk(str(saved))
    tok = tmp_path / "tok"
    shutil.copytree(small_bpe, tok)
    out = tmp_path / "run"
    argv = ["train", "--experiment", "dense", *sum((["--set", s] for s in TINY), []),
            "--set", "data.source=hf", "--set", f"data.path={saved}", "--set", "data.text_feature=content",
            "--set", f"data.tokenizer=bpe:{tok}", "--set", "model.vocab_size=512", "--set", "budget.steps=20",
            "--set", "checkpoint_every=10", "--out", str(out)]
    assert main(argv) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["state"] == "done" and s["vocab_size"] == 512 and s["tokenizer"] == f"bpe:{tok}"
    assert s["final_eval_bpb"] == pytest.approx(s["final_eval_loss"] * s["eval_tokens"] / (s["eval_bytes"] * math.log(2)))
    rows = read_jsonl(out / "metrics.jsonl")
    assert all(r["eval_bpb"] > 0 for r in rows if "eval_bpb" in r)
    df = runs.load(out)
    assert df.loc[0, "bpb"] == pytest.approx(s["final_eval_bpb"]) and df.loc[0, "unique_tokens"] == s["unique_tokens"]
    assert df.loc[0, "epochs"] == pytest.approx(20 * 8 * 32 / s["unique_tokens"])
    # the vocabulary is checked against the tokenizer's
    capsys.readouterr()
    assert main([*argv[:-1], str(tmp_path / "small"), "--set", "model.vocab_size=256"]) == 2
    assert "model.vocab_size: 256 is below the 512 tokens" in capsys.readouterr().err
    # an interrupted run whose tokenizer file changed is refused in one line, nothing lost
    (out / "summary.json").unlink()
    shutil.rmtree(out / "ckpt" / "20")
    other = tmp_path / "other"
    docs = sources.documents(DataConfig(source="local_text", path=str(text_dir), exclude=("*.md",)))
    tokenize.train_bpe(docs.train(), 512, other, {"source": "local_text"})
    shutil.copyfile(other / "tokenizer.json", tok / "tokenizer.json")
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "data.tokenizer: the tokenizer now has sha256" in err and "restore the original tokenizer" in err
    assert (out / "ckpt" / "10").exists() and read_jsonl(out / "metrics.jsonl")
    # missing dataset files: one line naming the path
    assert main([*argv[:-1], str(tmp_path / "r2"), "--set", f"data.path={tmp_path / 'absent'}"]) == 2
    assert f"data.path: '{tmp_path / 'absent'}' does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_training_from_shards_with_workers_resumes_bitwise(tmp_path):
    """A run on shards with a grain worker process, cut back to its step-10 checkpoint (as a
    crash after step 20 would leave it), resumes into the same metrics rows and losses."""
    sh = tmp_path / "sh"
    shards.prepare(DataConfig(source="packages", packages=("six", "pyyaml")), sh, log=lambda s: None)
    cfg = experiments.get("dense").with_overrides([*TINY, "data.source=shards", f"data.path={sh}", "data.worker_count=1",
                                                   "budget.steps=20", "checkpoint_every=10", "checkpoint_keep=3"])
    out = tmp_path / "run"
    first = loop.run(cfg, out)
    rows = read_jsonl(out / "metrics.jsonl")
    (out / "summary.json").unlink()
    shutil.rmtree(out / "ckpt" / "20")
    second = loop.run(cfg, out)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in WALL_FIELDS} for r in rs]  # noqa: E731
    assert strip(read_jsonl(out / "metrics.jsonl")) == strip(rows)
    assert (second["final_train_loss"], second["final_eval_loss"]) == (first["final_train_loss"], first["final_eval_loss"])


def test_hf_files_on_disk_are_read_without_the_hub_and_missing_columns_are_named(tmp_path):
    rows = [{"text": f"document {i}: " + "word " * (i % 7 + 1), "id": i} for i in range(120)]
    js = tmp_path / "jsonl"
    js.mkdir()
    (js / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:60]))
    (js / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[60:]))
    docs = sources.documents(DataConfig(source="hf", path=str(js)))
    train, held = list(docs.train()), list(docs.validation())
    assert len(train) + len(held) == 120 and held and set(train).isdisjoint(held)
    assert sorted(train + held) == sorted(r["text"].encode() for r in rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq_dir = tmp_path / "pq"
    pq_dir.mkdir()
    pq.write_table(pa.table({"text": [r["text"] for r in rows]}), pq_dir / "part-0.parquet")
    same = sources.documents(DataConfig(source="hf", path=str(pq_dir)))
    assert list(same.train()) == train and list(same.validation()) == held  # the same rows, the same split
    with pytest.raises(ConfigError, match="data.text_feature: .* has no column 'body'; it has"):
        sources.documents(DataConfig(source="hf", path=str(js), text_feature="body"))
    with pytest.raises(ConfigError, match="mixes file kinds"):
        sources.documents(DataConfig(source="hf", path=str(tmp_path)))
    with pytest.raises(ConfigError, match="data.source=hf needs data.path"):
        DataConfig(source="hf")


def _letters_dir(root: Path, letters: str, n_files: int = 12) -> Path:
    rng = np.random.default_rng(len(letters))
    root.mkdir(parents=True)
    for i in range(n_files):
        words = ["".join(rng.choice(list(letters), rng.integers(2, 8))) for _ in range(400)]
        (root / f"f{i:02d}.txt").write_text(" ".join(words) + "\n")
    return root


def test_mixtures_interleave_by_weight_deterministically_and_score_each_source(tmp_path, small_bpe):
    a = _letters_dir(tmp_path / "a", "abcdefghijklm")
    b = _letters_dir(tmp_path / "b", "nopqrstuvwxyz")
    for name, d in (("A", a), ("B", b)):
        shards.prepare(DataConfig(source="local_text", path=str(d)), tmp_path / name, log=lambda s: None)
    cfg = DataConfig(source="mixture", mixture=(f"{tmp_path / 'A'}=3", f"{tmp_path / 'B'}=7"), batch_size=10, seq_len=16,
                     eval_tokens=1600)
    it = loader.make_train_iterator(cfg, seed=0)
    batches = [next(it)["inputs"] for _ in range(100)]  # 1000 rows = one interleaving period
    from_a = np.array([[np.isin(r, np.frombuffer(b"abcdefghijklm", np.uint8)).any() for r in x] for x in batches])
    assert from_a.sum() == 300  # exactly the weight over a period, and no row mixes the two
    assert all(np.isin(r, np.frombuffer(b"nopqrstuvwxyz \n\x00", np.uint8)).all() for x, m in zip(batches, from_a)
               for r, ma in zip(x, m) if not ma)
    assert abs(from_a[:50].sum() - 150) <= 2  # spread evenly, not 300 A rows then 700 B rows
    again = loader.make_train_iterator(cfg, seed=0)
    again.set_state({"next_index": 60})
    assert np.array_equal(next(again)["inputs"], batches[60])
    ev = loader.eval_set(cfg)
    assert ev.group_tokens == {"A": 480, "B": 1120} and len(ev.groups) == len(ev.chunks)
    info = corpus.corpus_info(cfg)
    assert info["components"]["A"]["weight"] == 0.3 and info["n_train_tokens"] == sum(
        c["n_train_tokens"] for c in info["components"].values())
    from scaling.sweep import spec as spec_lib  # a spec writes the mixture as a mapping

    raw = {"name": "m", "experiment": "dense", "set": {"data": {"source": "mixture", "batch_size": 10, "seq_len": 16,
           "mixture": {str(tmp_path / "A"): 3, str(tmp_path / "B"): 7}}}, "buckets": [{"flops": 1e10, "sizes": [4096]}]}
    (trial,) = spec_lib.trials(spec_lib.parse(raw))
    assert trial.config.data.mixture == cfg.mixture
    with pytest.raises(ConfigError, match="data.mixture: .* is not SOURCE=WEIGHT"):
        DataConfig(source="mixture", mixture=("stdlib", "packages"))
    with pytest.raises(ConfigError, match="data.mixture: weight of 'stdlib' must be > 0"):
        DataConfig(source="mixture", mixture=("stdlib=0", "packages=1"))
    shards.prepare(DataConfig(source="local_text", path=str(a), tokenizer=f"bpe:{small_bpe}"), tmp_path / "C",
                   log=lambda s: None)
    with pytest.raises(ConfigError, match="data.mixture: components use different tokenizers"):
        corpus.corpus_info(DataConfig(source="mixture", mixture=(f"{tmp_path / 'A'}=1", f"{tmp_path / 'C'}=1")))


STDLIB_3_11_7 = {  # recorded with the code before shards and tokenizers existed (commit b0096a7)
    "sha256": "116b50ff1ca8aa39b0556ee145b92fd8b9033b0b265d4d7c387453448269adde",
    "batches": "7c87d99050b054d0496bab3d612c03a6428d577e1dcc563abdfaea2d8873ba76",  # seed 3, first 5 default batches
    "eval": "11ceae1fefee38bf5af8c41631da73498a061364b3a8ddd5df86c43b964b30a5",
}


def test_stdlib_bytes_are_the_tokens_recorded_before_this_change():
    import sys

    cfg = DataConfig()
    info = corpus.corpus_info(cfg)
    if sys.version_info[:3] != (3, 11, 7) or info["n_train_tokens"] != 11_997_328:
        pytest.skip(f"hashes were recorded on CPython 3.11.7's stdlib (this is {sys.version.split()[0]}, "
                    f"{info['n_train_tokens']} tokens)")
    it = loader.make_train_iterator(cfg, seed=3)
    h = hashlib.sha256()
    for _ in range(5):
        h.update(next(it)["inputs"].tobytes())
    assert (info["sha256"], h.hexdigest(), loader.eval_set(cfg).sha256) == tuple(STDLIB_3_11_7.values())


def test_tokenizers_without_whole_byte_ids_use_the_split_mean_and_specials_in_text_stay_text(tmp_path, text_dir, small_bpe):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.Whitespace()
    wp.train_from_iterator([p.read_text() for p in sorted(text_dir.rglob("*.py"))],
                           trainers.WordPieceTrainer(vocab_size=400, special_tokens=["[UNK]", "[SEP]"], show_progress=False))
    wp.save(str(tmp_path / "wp.json"))
    tok = tokenize.get_tokenizer(f"hf:{tmp_path / 'wp.json'}")
    assert tok.token_bytes() is None and tok.separator == wp.token_to_id("[SEP]")  # spaces are not in its pieces
    cfg = DataConfig(source="local_text", path=str(text_dir), seq_len=32, tokenizer=f"hf:{tmp_path / 'wp.json'}")
    ev, c = loader.eval_set(cfg), corpus.load(cfg)
    assert ev.bytes_exact is False and ev.n_bytes == round(ev.n_tokens * c.n_eval_bytes / c.eval.size)
    assert loader.eval_set(dataclasses.replace(cfg, tokenizer=f"bpe:{small_bpe}")).bytes_exact is True
    bpe = tokenize.get_tokenizer(f"bpe:{small_bpe}")
    assert bpe.separator not in bpe.encode("a <|sep|> b") and bpe.decode(bpe.encode("a <|sep|> b")) == "a <|sep|> b"
    spec = json.loads((small_bpe / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["add_prefix_space"] = True  # one byte per document its text does not hold
    (tmp_path / "prefixed.json").write_text(json.dumps(spec))
    assert tokenize.get_tokenizer(f"hf:{tmp_path / 'prefixed.json'}").token_bytes() is None


def test_speed_settings_keep_trial_ids_and_lists_are_read_as_written(tmp_path):
    from scaling.config import TrainConfig, config_hash

    base = TrainConfig()
    assert config_hash(base.with_overrides(["data.worker_count=2"])) == config_hash(base)
    cfg = base.with_overrides(["data.source=local_text", "data.path=/x", "data.include=*.py, docs/(a)*.md"])
    assert cfg.data.include == ("*.py", "docs/(a)*.md")
    assert cfg.with_overrides(["data.include=(*.py,*.md)"]).data.include == ("*.py", "*.md")
    from scaling.fit import io

    csv = tmp_path / "t.csv"
    csv.write_text("N,D,final_loss,loss_se\n1e5,1e6,3.0,0.01\n2e5,1e6,2.9,0.02\n")
    df, _ = io.load_table(str(csv), columns="loss=final_loss")  # no other loss: its loss_se is this one's
    assert list(df["loss_se"]) == [0.01, 0.02]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text(json.dumps({"format": shards.FORMAT, "name": "x"}))
    with pytest.raises(ConfigError, match="data.path: .* is incomplete"):
        shards.read_manifest(bad)


def test_a_mixture_with_eval_tokens_unset_takes_what_each_source_holds(tmp_path):
    small = _letters_dir(tmp_path / "s", "abc", n_files=3)
    shards.prepare(DataConfig(source="local_text", path=str(small)), tmp_path / "S", log=lambda s: None)
    cfg = DataConfig(source="mixture", mixture=("stdlib=0.5", f"{tmp_path / 'S'}=0.5"), seq_len=32)
    ev = loader.eval_set(cfg)
    held = corpus.load(DataConfig(source="shards", path=str(tmp_path / "S"))).eval.size
    std_held = len(corpus.window_starts(corpus.load(DataConfig()).eval.size, 32)) * 32
    assert 0 < ev.group_tokens["S"] <= held  # capped at what it holds (asking for 2^17 would be refused)
    assert ev.group_tokens["stdlib"] == min(std_held, (loader.DEFAULT_EVAL_TOKENS // 2 // 32) * 32)
