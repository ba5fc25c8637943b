"""Data layer: corpora, the held-out split, exact resume, per-host shards, synthetic truth."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from scaling.config import ConfigError, DataConfig, TrainConfig
from scaling.data import builders, corpus, loader
from scaling.data.synthetic import MarkovZipf
from scaling.data.tokenize import SEPARATOR

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A fresh dataset cache for this module, so building is exercised, not just reuse."""
    d = tmp_path_factory.mktemp("tfds_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCALING_DATA_DIR", str(d))
        yield d


def _entropy(tokens: np.ndarray) -> float:
    _, counts = np.unique(tokens, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def _take(it, n):
    return [next(it) for _ in range(n)]


def _write_text_dir(root: Path, n_files: int, size: int, seed: int = 0) -> Path:
    """Files of random lowercase text: every window of the packed stream is unique."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        letters = rng.integers(ord("a"), ord("z") + 1, size).astype(np.uint8)
        letters[rng.random(size) < 0.1] = ord("\n")
        (root / f"doc{i:03d}.txt").write_bytes(letters.tobytes())
    return root


# --------------------------------------------------------------------------------------------
# The embedded corpus
# --------------------------------------------------------------------------------------------


def test_stdlib_corpus_size_entropy_split_and_concurrent_build(data_dir, tmp_path):
    cfg = DataConfig()
    # Two processes build the same corpus into one empty cache at the same time.
    shared = tmp_path / "shared_cache"
    code = "from scaling.config import DataConfig; from scaling.data import corpus; print(corpus.corpus_info(DataConfig())['sha256'])"
    env = {**os.environ, "SCALING_DATA_DIR": str(shared)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    hashes = {o[0].strip().splitlines()[-1] for o in outs}

    info = corpus.corpus_info(cfg)  # built again, in this process, into another empty cache
    assert hashes == {info["sha256"]}, "content hash must not depend on the build or the racing builder"
    assert len(list(shared.glob("stdlib/*/scaling_stdlib/1.0.0/*train.array_record*"))) == 1

    assert info["n_train_tokens"] >= 10_000_000
    assert 0.008 <= info["n_eval_tokens"] / (info["n_train_tokens"] + info["n_eval_tokens"]) <= 0.03

    # Every stdlib text file appears exactly once, in exactly one split, followed by a separator.
    files = builders.stdlib_files()
    docs = builders.read_documents(files, builders.stdlib_root())
    assert info["n_train_tokens"] + info["n_eval_tokens"] == sum(len(d) for _, d in docs) + len(docs)
    builder = builders.stdlib_builder()
    train_paths = set(builders.read_split(builder, "train", "path"))
    eval_paths = set(builders.read_split(builder, "validation", "path"))
    assert eval_paths and not (train_paths & eval_paths)
    assert train_paths | eval_paths == {p.encode() for p, _ in docs}
    assert not any("/test/" in "/" + p.decode() for p in train_paths | eval_paths)

    c = corpus.load(cfg)
    assert info["unigram_entropy_nats"] == pytest.approx(_entropy(c.train), rel=1e-9)
    assert 3.1 < info["unigram_entropy_nats"] < 3.4  # ARCHITECTURE.md measured 3.24 nats
    assert (c.train == SEPARATOR).sum() == len(train_paths)


def test_one_held_out_set_for_every_batch_size(data_dir):
    sets = {b: loader.eval_set(DataConfig(seq_len=128, batch_size=b)) for b in (8, 32, 128)}
    assert len({s.sha256 for s in sets.values()}) == 1  # the same tokens scored at every batch size
    s = sets[128]
    n_windows = len(corpus.window_starts(corpus.load(DataConfig()).eval.size, 128, corpus.load(DataConfig()).chain_len))
    assert s.n_sequences == min(n_windows, loader.DEFAULT_EVAL_TOKENS // 128) and s.n_tokens == 128 * s.n_sequences
    assert [len(c["inputs"]) for c in s.chunks[:-1]] == [loader.EVAL_CHUNK] * (len(s.chunks) - 1)
    small = loader.eval_set(DataConfig(seq_len=128, batch_size=8, eval_tokens=128 * 40))
    assert small.n_sequences == 40 and [len(c["inputs"]) for c in small.chunks] == [32, 8]
    padded = loader.pad_rows(small.chunks[1], 16)
    assert padded["inputs"].shape == (16, 128) and padded["weights"].sum() == 8 * 128
    with pytest.raises(ConfigError, match=r"^data\.eval_tokens: .* more than the held-out split"):
        loader.eval_set(DataConfig(seq_len=128, eval_tokens=10**9))
    with pytest.raises(ConfigError, match=r"^data\.eval_batches: replaced by data\.eval_tokens"):
        TrainConfig().with_overrides(["data.eval_batches=8"])

    cfg = DataConfig(seq_len=64, batch_size=8, eval_tokens=64 * 24)
    a, b = loader.eval_batches(cfg), loader.eval_batches(cfg)
    assert len(a) == 1 and a[0]["inputs"].shape == (24, 64) and a[0]["inputs"].dtype == np.int32
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
        np.testing.assert_array_equal(x["inputs"][:, 1:], x["targets"][:, :-1])
    # Each eval row is a slice of the held-out stream, not of the training stream's windows.
    ev = corpus.load(cfg).eval.tobytes()
    rows = np.concatenate([np.concatenate([x["inputs"], x["targets"][:, -1:]], 1) for x in a])
    assert all(r.astype(np.uint8).tobytes() in ev for r in rows)
    assert len({r.tobytes() for r in rows}) == len(rows)


# --------------------------------------------------------------------------------------------
# Loader: packing, exact resume, epochs, hosts
# --------------------------------------------------------------------------------------------


def test_exact_resume_across_epochs_and_epoch_coverage(data_dir, tmp_path):
    root = _write_text_dir(tmp_path / "txt", n_files=6, size=2000)
    cfg = DataConfig(source="local_text", path=str(root), seq_len=32, batch_size=8, eval_tokens=256)
    info = corpus.corpus_info(cfg)
    assert info["n_train_tokens"] + info["n_eval_tokens"] == 6 * 2001
    W = info["windows_per_epoch"]
    n_steps = 3 * W // cfg.batch_size + 2  # crosses two epoch boundaries

    whole = _take(loader.make_train_iterator(cfg, seed=5), n_steps)
    it = loader.make_train_iterator(cfg, seed=5)
    k = W // cfg.batch_size + 1  # interrupt inside the second epoch
    first = _take(it, k)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    resumed = loader.make_train_iterator(cfg, seed=5)
    resumed.set_state(state)
    rest = _take(resumed, n_steps - k)
    for x, y in zip(whole, first + rest):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
        np.testing.assert_array_equal(x["targets"], y["targets"])

    # Packing: targets are inputs shifted by one, and every row is a slice of the train stream.
    stream = corpus.load(cfg).train
    rows = np.concatenate([np.concatenate([b["inputs"], b["targets"][:, -1:]], 1) for b in whole])
    assert all(r.astype(np.uint8).tobytes() in stream.tobytes() for r in rows[:50])
    # Epochs: each epoch's W slots hold every window exactly once, in a new order.
    all_windows = {stream[s : s + 33].tobytes() for s in corpus.window_starts(stream.size, 32)}
    epochs = [rows[e * W : (e + 1) * W] for e in range(3)]
    for ep in epochs:
        assert {r.astype(np.uint8).tobytes() for r in ep} == all_windows
    assert not np.array_equal(epochs[0], epochs[1])
    # A different seed is a different order of the same windows.
    other = _take(loader.make_train_iterator(cfg, seed=6), 1)[0]
    assert not np.array_equal(other["inputs"], whole[0]["inputs"])


def test_per_host_shards_partition_the_global_batch(data_dir):
    cfg = DataConfig(seq_len=32, batch_size=16)
    glob = _take(loader.make_train_iterator(cfg, seed=1), 4)
    hosts = [_take(loader.make_train_iterator(cfg, seed=1, process_index=p, process_count=4), 4) for p in range(4)]
    for s in range(4):
        for p in range(4):
            assert hosts[p][s]["inputs"].shape == (4, 32)
            np.testing.assert_array_equal(hosts[p][s]["inputs"], glob[s]["inputs"][4 * p : 4 * p + 4])
            np.testing.assert_array_equal(hosts[p][s]["targets"], glob[s]["targets"][4 * p : 4 * p + 4])
            np.testing.assert_array_equal(loader.host_slice(glob[s], p, 4)["inputs"], hosts[p][s]["inputs"])
    with pytest.raises(ConfigError, match=r"^data\.batch_size:"):
        loader.make_train_iterator(cfg, seed=1, process_index=0, process_count=3)


def test_iterator_state_is_a_step_counter(data_dir):
    """Resuming costs nothing: the checkpointed state is the next step index, whatever the corpus."""
    it = loader.make_train_iterator(DataConfig(), seed=0)
    _take(it, 3)
    assert it.get_state() == {"next_index": 3, "sequences": 3 * DataConfig().batch_size}


def test_batch_schedule_reads_each_window_once_in_order_across_the_switch(data_dir):
    """A schedule 4 -> 12 sequences reads global slots back to back: the scheduled run's windows
    are the constant-batch run's windows regrouped (no slot skipped or read twice), and a batch
    switch lands on the first step that starts at or after its token count."""
    from scaling.data.batch_schedule import BatchSchedule

    base = dict(seq_len=16, batch_size=4)
    plain = loader.make_train_iterator(DataConfig(**base), seed=0)
    sched_cfg = DataConfig(**base, batch_schedule=("100:12",))
    sched = loader.make_train_iterator(sched_cfg, seed=0)
    flat_plain = np.concatenate([next(plain)["inputs"] for _ in range(12)])
    got = [next(sched)["inputs"] for _ in range(5)]
    assert [g.shape[0] for g in got] == [4, 4, 12, 12, 12]  # step 2 starts at 128 >= 100 tokens
    assert np.array_equal(np.concatenate(got), flat_plain[:44])
    assert sched.get_state() == {"next_index": 5, "sequences": 44}
    s = BatchSchedule.of(sched_cfg)
    assert (s.tokens_before(5), s.steps_for_tokens(44 * 16)) == (44 * 16, 5)
    with pytest.raises(ConfigError, match=r"data.batch_schedule\[0\]: expected TOKENS:BATCH"):
        DataConfig(**base, batch_schedule=("lots",))
    with pytest.raises(ConfigError, match=r"data.batch_schedule\[1\]: tokens must increase"):
        DataConfig(**base, batch_schedule=("100:8", "50:16"))


# --------------------------------------------------------------------------------------------
# Other sources and bad input
# --------------------------------------------------------------------------------------------


class TinyTestCorpus(tfds.core.GeneratorBasedBuilder):
    """A named tfds dataset with a text feature, as a user would bring."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"body": tfds.features.Text(), "id": np.int64}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 40), "validation": self._generate_examples(40, 44)}

    def _generate_examples(self, lo, hi):
        for i in range(lo, hi):
            yield i, {"body": f"document {i}: " + "lorem ipsum " * (5 + i % 7), "id": i}


def test_tfds_named_dataset_source(data_dir, tmp_path):
    TinyTestCorpus(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    cfg = DataConfig(source="tfds", tfds_name="tiny_test_corpus", path=str(tmp_path), text_feature="body",
                     seq_len=16, batch_size=4, eval_tokens=16 * 8)
    info = corpus.corpus_info(cfg)
    docs = {i: f"document {i}: " + "lorem ipsum " * (5 + i % 7) for i in range(44)}
    assert info["n_train_tokens"] == sum(len(docs[i]) + 1 for i in range(40))
    assert info["n_eval_tokens"] == sum(len(docs[i]) + 1 for i in range(40, 44))
    c = corpus.load(cfg)
    eval_docs = sorted(c.eval.tobytes().split(b"\0")[:-1])
    assert eval_docs == sorted(docs[i].encode() for i in range(40, 44))
    b = next(loader.make_train_iterator(cfg, seed=0))
    assert b["inputs"].shape == (4, 16)
    assert all(r.astype(np.uint8).tobytes() in c.train.tobytes() for r in b["inputs"])
    assert len(loader.eval_batches(cfg)) == 1 and len(loader.eval_batches(cfg)[0]["inputs"]) == 8
    # On a cluster the trainer has only the prepared files, not the builder's code.
    code = ("from scaling.config import DataConfig; from scaling.data import corpus; "
            f"print(corpus.corpus_info(DataConfig(source='tfds', tfds_name='tiny_test_corpus', path={str(tmp_path)!r}, "
            "text_feature='body', seq_len=16, batch_size=4, eval_tokens=128))['sha256'])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == info["sha256"]

    with pytest.raises(ConfigError, match=r"^data\.text_feature:"):
        corpus.load(DataConfig(source="tfds", tfds_name="tiny_test_corpus", path=str(tmp_path), text_feature="text"))
    with pytest.raises(ConfigError, match=r"^data\.tfds_name:"):
        corpus.load(DataConfig(source="tfds", tfds_name="no_such_corpus_xyz", path=str(tmp_path)))


def test_bad_inputs_name_the_field(data_dir, tmp_path):
    def err(**kw):
        with pytest.raises(ConfigError) as e:
            loader.make_train_iterator(DataConfig(**kw), seed=0)
        return str(e.value)

    assert err(source="local_text", path=str(tmp_path / "missing")).startswith("data.path:")
    (tmp_path / "empty").mkdir()
    assert err(source="local_text", path=str(tmp_path / "empty")).startswith("data.path:")
    (tmp_path / "binary").mkdir()
    (tmp_path / "binary" / "x.bin").write_bytes(b"\x00\x01\x02")
    assert err(source="local_text", path=str(tmp_path / "binary")).startswith("data.path:")
    small = _write_text_dir(tmp_path / "small", n_files=2, size=300)
    assert err(source="local_text", path=str(small), seq_len=4096).startswith("data.seq_len:")
    assert err(source="local_text", path=str(small), seq_len=8, batch_size=512).startswith("data.batch_size:")
    assert err(source="local_text", path=str(small), seq_len=8, batch_size=4, eval_tokens=8 * 500).startswith("data.eval_tokens:")
    assert err(source="local_text", path=str(small), seq_len=8, batch_size=4, shuffle_seed=-1).startswith("data.shuffle_seed:")
    # A single file still gets a fixed held-out tail.
    one = _write_text_dir(tmp_path / "one", n_files=1, size=5000)
    info = corpus.corpus_info(DataConfig(source="local_text", path=str(one), seq_len=8, batch_size=2, eval_tokens=8))
    assert info["n_eval_tokens"] > 0 and info["n_train_tokens"] + info["n_eval_tokens"] == 5000 + 2


# --------------------------------------------------------------------------------------------
# Synthetic source: the truth a fitted irreducible loss is checked against
# --------------------------------------------------------------------------------------------


def test_synthetic_entropy_rate_is_exact(data_dir):
    cfg = DataConfig(source="synthetic", synthetic_vocab=32, synthetic_zipf=1.1, synthetic_tokens=2_000_000,
                     seq_len=128, batch_size=32, eval_tokens=128 * 128)
    info = corpus.corpus_info(cfg)
    chain = MarkovZipf(32, 1.1, corpus.SYNTHETIC_SEED)
    P = chain.transition
    # Independent route to the truth: stationary distribution by matrix power.
    pi = np.linalg.matrix_power(P, 512)[0]
    truth = float(-(pi[:, None] * P * np.log(P)).sum())
    assert info["entropy_rate_nats"] == pytest.approx(truth, rel=1e-9)
    # Every row is a permutation of one Zipf law, so the rate is also that law's entropy.
    w = np.arange(1, 33) ** -1.1
    w /= w.sum()
    assert info["entropy_rate_nats"] == pytest.approx(float(-(w * np.log(w)).sum()), rel=1e-9)
    assert info["entropy_rate_nats"] < info["unigram_entropy_nats"] < np.log(32)

    # Empirical: -mean ln P(target | input) over what the loader actually serves.
    it = loader.make_train_iterator(cfg, seed=0)
    nll = [-np.log(P[b["inputs"], b["targets"]]).mean() for b in _take(it, 150)]  # ~615K transitions
    assert float(np.mean(nll)) == pytest.approx(info["entropy_rate_nats"], rel=0.01)
    ev = [-np.log(P[b["inputs"], b["targets"]]).mean() for b in loader.eval_batches(cfg)]
    assert float(np.mean(ev)) == pytest.approx(info["entropy_rate_nats"], rel=0.03)
    assert info["unigram_entropy_nats"] == pytest.approx(info["stationary_entropy_nats"], rel=0.01)


def test_unique_tokens_caps_training_to_evenly_spread_windows_repeated_each_epoch(data_dir, tmp_path):
    """``data.unique_tokens``: a run trains on that many tokens of whole windows spread over the
    split, each epoch the same windows in a new order; the held-out set and the trial ids of
    uncapped configs do not change; a cap larger than the split is one ConfigError."""
    from scaling.config import config_hash

    root = _write_text_dir(tmp_path / "txt", n_files=6, size=2000)
    full = DataConfig(source="local_text", path=str(root), seq_len=32, batch_size=4, eval_tokens=256)
    cfg = DataConfig(source="local_text", path=str(root), seq_len=32, batch_size=4, eval_tokens=256, unique_tokens=32 * 40)
    info, full_info = corpus.corpus_info(cfg), corpus.corpus_info(full)
    assert info["unique_tokens"] == 40 * 32 and info["windows_per_epoch"] == 40 and info["steps_per_epoch"] == 10
    assert full_info["unique_tokens"] == full_info["n_train_tokens"] == info["n_train_tokens"]
    stream = corpus.load(cfg).train
    starts = corpus.training_windows(cfg, corpus.load(cfg))
    assert starts[0] == 0 and starts[-1] > 0.9 * stream.size - 2 * 32  # spread over the split, not its first files
    rows = np.concatenate([np.concatenate([b["inputs"], b["targets"][:, -1:]], 1)
                           for b in _take(loader.make_train_iterator(cfg, seed=1), 30)])
    kept = {stream[s: s + 33].tobytes() for s in starts}
    epochs = [{r.astype(np.uint8).tobytes() for r in rows[e * 40:(e + 1) * 40]} for e in range(3)]
    assert all(ep == kept for ep in epochs)
    assert loader.eval_set(cfg).sha256 == loader.eval_set(full).sha256
    from scaling.config import hashed_dict

    assert "unique_tokens" not in hashed_dict(TrainConfig(data=full))["data"]  # trial ids of earlier sweeps kept
    assert config_hash(TrainConfig(data=cfg)) != config_hash(TrainConfig(data=full))
    with pytest.raises(ConfigError, match="data.unique_tokens: .* is more than the"):
        corpus.corpus_info(DataConfig(source="local_text", path=str(root), seq_len=32, batch_size=4, eval_tokens=256,
                                      unique_tokens=10 ** 6))
    with pytest.raises(ConfigError, match="data.unique_tokens: must be a whole number"):
        DataConfig(seq_len=32, batch_size=4, unique_tokens=64)
