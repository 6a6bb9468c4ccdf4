"""Tests of tokenizers and datasets. They read the offline data folder and never touch the network."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

# Offline flags must be set before `datasets`/`huggingface_hub` are imported anywhere.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402

from discreteflow_jax.data import (  # noqa: E402
    DataError,
    FineWebData,
    ShakespeareData,
    Tokenizer,
    load_tokenizer,
    make_dataset,
    resolve_data_dir,
)
from discreteflow_jax.data import shakespeare as shakespeare_module  # noqa: E402
from discreteflow_jax.data import tokenizers as tokenizers_module  # noqa: E402

DATA_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
LLAMA_FIRST_CITIZEN = [3824, 21353, 19642, 29901]
GPT2_HELLO_WORLD = [15496, 995]
SHAKESPEARE_LLAMA_TOKENS = 368_633


def _no_network(*args, **kwargs):
    raise ConnectionError("network disabled in tests")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One cache per test session: the token cache is exercised, and the user's home cache is never touched.
    return tmp_path_factory.mktemp("discreteflow_cache")


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, cache_dir: Path) -> None:
    monkeypatch.setenv(tokenizers_module.CACHE_DIR_ENV, str(cache_dir))
    monkeypatch.delenv(tokenizers_module.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(tokenizers_module, "_hf_download", _no_network)
    monkeypatch.setattr(shakespeare_module, "_download_url", _no_network)


@pytest.fixture(scope="session")
def data_dir() -> str:
    if not DATA_DIR.is_dir():
        pytest.skip(f"offline data folder {DATA_DIR} (shared/data next to the repository) is absent")
    return str(DATA_DIR)


@pytest.fixture(scope="session")
def llama(data_dir: str) -> Tokenizer:
    return load_tokenizer("llama", data_dir)


@pytest.fixture(scope="session")
def gpt2(data_dir: str) -> Tokenizer:
    return load_tokenizer("gpt2", data_dir)


@pytest.fixture(scope="session")
def shakespeare(data_dir: str, llama: Tokenizer, cache_dir: Path) -> ShakespeareData:
    # The autouse fixture is function-scoped, so point the session-scoped cache here explicitly.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(tokenizers_module.CACHE_DIR_ENV, str(cache_dir))
        mp.setattr(shakespeare_module, "_download_url", _no_network)
        return ShakespeareData(64, llama, data_dir=data_dir, seed=3)


# ---------------------------------------------------------------------------------------------- tokenizers


def test_llama_tokenizer_ids(llama: Tokenizer) -> None:
    assert llama.encode("First Citizen:") == LLAMA_FIRST_CITIZEN
    assert (llama.name, llama.vocab_size, llama.bos_id, llama.eos_id, llama.pad_id) == ("llama", 32000, 1, 2, 2)


def test_gpt2_tokenizer_ids(gpt2: Tokenizer) -> None:
    assert gpt2.encode("Hello world") == GPT2_HELLO_WORLD
    assert (gpt2.name, gpt2.vocab_size, gpt2.bos_id, gpt2.eos_id, gpt2.pad_id) == ("gpt2", 50257, 50256, 50256, 50256)
    # The literal marker string in a document must not become the EOS id.
    assert gpt2.eos_id not in gpt2.encode("a <|endoftext|> b")


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_round_trip_and_eos_cut(which: str, request: pytest.FixtureRequest) -> None:
    tok: Tokenizer = request.getfixturevalue(which)
    text = "First Citizen:\nBefore we proceed any further, hear me speak. Ünïcødé — ok?"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(np.asarray(ids, dtype=np.int32)) == text
    assert tok.encode_batch([text, "x"]) == [ids, tok.encode("x")]
    head = tok.encode("Hello there")
    tail = tok.encode(" never shown")
    assert tok.decode_until_eos(head + [tok.eos_id] + tail) == "Hello there"
    assert tok.decode_until_eos(np.asarray(head)) == "Hello there"
    assert tok.decode_until_eos([tok.bos_id] + head + [tok.eos_id], skip_leading_bos=True) == "Hello there"


def test_unknown_tokenizer(data_dir: str) -> None:
    with pytest.raises(DataError, match="llama, gpt2"):
        load_tokenizer("bert", data_dir)


def test_resolve_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_data_dir(None) is None
    assert resolve_data_dir("") is None
    monkeypatch.setenv("DISCRETEFLOW_DATA_DIR", "/from/env")
    assert resolve_data_dir("") == "/from/env"
    assert resolve_data_dir(None) == "/from/env"
    assert resolve_data_dir("/from/config") == "/from/config"


def test_env_var_points_at_data_folder(monkeypatch: pytest.MonkeyPatch, data_dir: str) -> None:
    monkeypatch.setenv("DISCRETEFLOW_DATA_DIR", data_dir)
    assert load_tokenizer("gpt2").encode("Hello world") == GPT2_HELLO_WORLD


@pytest.mark.parametrize(
    ("name", "relpath", "online"),
    [
        ("llama", "llama_tokenizer/tokenizer.model", "huggyllama/llama-7b"),
        ("gpt2", "gpt2_tokenizer/vocab.json", "'gpt2'"),
    ],
)
def test_missing_tokenizer_error(tmp_path: Path, name: str, relpath: str, online: str) -> None:
    missing = str(tmp_path / "no_such_folder")
    with pytest.raises(DataError) as info:
        load_tokenizer(name, missing)
    message = str(info.value)
    for part in (relpath, missing, "DISCRETEFLOW_DATA_DIR", "data.data_dir", online, "network disabled"):
        assert part in message


def test_missing_shakespeare_error(tmp_path: Path, llama: Tokenizer) -> None:
    with pytest.raises(DataError) as info:
        ShakespeareData(64, llama, data_dir=str(tmp_path))
    message = str(info.value)
    for part in ("tiny_shakespeare/input.txt", str(tmp_path), "DISCRETEFLOW_DATA_DIR", "raw.githubusercontent.com"):
        assert part in message


# ---------------------------------------------------------------------------------------------- Shakespeare


def test_shakespeare_splits(shakespeare: ShakespeareData) -> None:
    total = shakespeare.num_train_tokens + shakespeare.num_val_tokens
    assert total == SHAKESPEARE_LLAMA_TOKENS
    assert shakespeare.num_train_tokens == int(SHAKESPEARE_LLAMA_TOKENS * 0.9)
    assert shakespeare.train_tokens[:4].tolist() == LLAMA_FIRST_CITIZEN  # train comes first
    assert shakespeare.train_tokens.dtype == np.int32


def test_shakespeare_train_determinism(shakespeare: ShakespeareData, data_dir: str, llama: Tokenizer) -> None:
    batch = shakespeare.train_batch(5, 8)
    assert batch.shape == (8, 64) and batch.dtype == np.int32
    # A fresh instance (loaded from the token cache) reproduces the batch exactly: resume needs no state.
    again = ShakespeareData(64, llama, data_dir=data_dir, seed=3)
    np.testing.assert_array_equal(again.train_batch(5, 8), batch)
    assert not np.array_equal(shakespeare.train_batch(6, 8), batch)
    offsets = shakespeare.train_offsets(5, 8)
    np.testing.assert_array_equal(batch, np.stack([shakespeare.train_tokens[o : o + 64] for o in offsets]))
    other_seed = ShakespeareData(64, llama, data_dir=data_dir, seed=4)
    assert not np.array_equal(other_seed.train_batch(5, 8), batch)
    shakespeare.restore(shakespeare.state())
    np.testing.assert_array_equal(shakespeare.train_batch(5, 8), batch)


def test_shakespeare_processes_differ(shakespeare: ShakespeareData) -> None:
    off0 = shakespeare.train_offsets(2, 16, process_index=0)
    off1 = shakespeare.train_offsets(2, 16, process_index=1)
    assert set(off0.tolist()).isdisjoint(off1.tolist())
    assert off0.max() <= shakespeare.num_train_tokens - 64
    np.testing.assert_array_equal(
        shakespeare.train_batch(2, 16, process_index=1, process_count=2),
        shakespeare.train_tokens[off1[:, None] + np.arange(64)],
    )


def test_shakespeare_val_batches(shakespeare: ShakespeareData) -> None:
    batches = shakespeare.val_batches(4, 3)
    assert len(batches) == 3 and all(b.shape == (4, 64) for b in batches)
    np.testing.assert_array_equal(np.stack(batches), np.stack(shakespeare.val_batches(4, 3)))
    both = [shakespeare.val_offsets(4, 3, process_index=p, process_count=2).ravel() for p in range(2)]
    assert set(both[0].tolist()).isdisjoint(both[1].tolist())
    # Same global batch on one process: the same windows, so val loss does not depend on the process count.
    np.testing.assert_array_equal(np.concatenate(both), shakespeare.val_offsets(8, 3).ravel())
    starts = np.sort(np.concatenate(both))
    assert np.all(np.diff(starts) >= 64)  # non-overlapping
    assert starts[-1] + 64 <= shakespeare.num_val_tokens
    assert len(shakespeare.val_batches(16)) == shakespeare.max_val_windows() // 16


def test_shakespeare_entropy(shakespeare: ShakespeareData) -> None:
    # The LLaMA-token unigram entropy of the training split: 6.3024 nats over 331,769 tokens of 7,762
    # distinct ids (9.09 in bits: a log2 slip fails, so does a wrong split or an off-by-one count).
    assert len(shakespeare.train_tokens) == 331_769
    assert shakespeare.unigram_entropy() == pytest.approx(6.3024, abs=0.005)


def test_shakespeare_errors(shakespeare: ShakespeareData, data_dir: str, llama: Tokenizer) -> None:
    with pytest.raises(DataError, match="seq_len"):
        ShakespeareData(40_000, llama, data_dir=data_dir)
    with pytest.raises(DataError):
        shakespeare.train_batch(-1, 4)
    with pytest.raises(DataError, match="valid names: shakespeare, fineweb"):
        make_dataset("imagenet", 64, llama, data_dir=data_dir)
    made = make_dataset("shakespeare", 64, llama, data_dir=data_dir, seed=3)
    np.testing.assert_array_equal(made.train_batch(1, 2), shakespeare.train_batch(1, 2))


# ---------------------------------------------------------------------------------------------- FineWeb

NUM_DOCS = 300
SEQ = 32
_WORDS = "the quick brown fox jumps over lazy dogs while seven wise owls watch quietly from old oak trees".split()
_MARKER = re.compile(r"<<(\d+)>>")


def _docs(count: int = NUM_DOCS) -> list[str]:
    rng = np.random.default_rng(0)
    return [f"<<{i}>> " + " ".join(rng.choice(_WORDS, size=int(rng.integers(3, 40)))) for i in range(count)]


def _stream(tok: Tokenizer, docs: list[str]) -> list[int]:
    out: list[int] = []
    for doc in docs:
        out += tok.encode(doc) + [tok.eos_id]
    return out


def _ids(tok: Tokenizer, rows: list[np.ndarray]) -> list[int]:
    if not rows:
        return []
    return [int(m) for m in _MARKER.findall(tok.decode(np.concatenate(rows).ravel()))]


@pytest.fixture(scope="module")
def jsonl_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("fw") / "docs.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, doc in enumerate(_docs()):
            f.write(json.dumps({"id": i, "text": doc}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def parquet_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("fw") / "docs.parquet"
    pq.write_table(pa.table({"text": _docs(), "url": [f"u{i}" for i in range(NUM_DOCS)]}), path)
    return str(path)


@pytest.fixture(scope="module")
def jsonl_folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("fw_folder")
    docs = _docs()
    for part in range(2):
        with open(folder / f"part{part}.jsonl", "w", encoding="utf-8") as f:
            for doc in docs[part * NUM_DOCS // 2 : (part + 1) * NUM_DOCS // 2]:
                f.write(json.dumps({"text": doc}) + "\n")
    return str(folder)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_fineweb_packing_exact(fmt: str, gpt2: Tokenizer, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(f"{fmt}_file")
    data = FineWebData(SEQ, gpt2, local_path=path, val_rows=3, shuffle_buffer=0)
    stream = _stream(gpt2, _docs())
    val = data.val_batches(3, 1)[0]
    assert val.shape == (3, SEQ) and val.dtype == np.int32
    assert val.ravel().tolist() == stream[: 3 * SEQ]
    k = data.num_val_docs
    assert len(_stream(gpt2, _docs()[: k - 1])) < 3 * SEQ <= len(_stream(gpt2, _docs()[:k]))
    train = np.concatenate([data.train_batch(step, 4) for step in range(5)])
    assert train.shape == (20, SEQ) and train.dtype == np.int32
    # Unshuffled training rows are exactly the EOS-joined stream of the documents after the validation ones.
    assert train.ravel().tolist() == _stream(gpt2, _docs()[k:])[: 20 * SEQ]


def test_fineweb_heldout_disjoint_and_epoch_is_permutation(jsonl_file: str, gpt2: Tokenizer) -> None:
    data = FineWebData(SEQ, gpt2, local_path=jsonl_file, val_rows=8, shuffle_buffer=32, seed=1)
    k = data.num_val_docs
    val_ids = _ids(gpt2, data.val_batches(4, 2))
    assert val_ids and max(val_ids) < k
    epoch_tokens = len(_stream(gpt2, _docs()[k:]))
    num_rows = -(-epoch_tokens // SEQ) + 1
    rows = [data.train_batch(0, num_rows)]
    first_epoch = np.concatenate(rows).ravel()[:epoch_tokens].tolist()
    # Split the first epoch at EOS: it holds exactly the training documents, each once, in shuffled order.
    eos = gpt2.eos_id
    ends = [i for i, t in enumerate(first_epoch) if t == eos]
    assert ends[-1] == epoch_tokens - 1
    docs_seen = [first_epoch[a + 1 : b] for a, b in zip([-1] + ends[:-1], ends)]
    expected = [gpt2.encode(d) for d in _docs()[k:]]
    assert sorted(map(tuple, docs_seen)) == sorted(map(tuple, expected))
    train_ids = _ids(gpt2, rows)
    assert set(train_ids).isdisjoint(val_ids)
    assert sorted(set(train_ids)) == list(range(k, NUM_DOCS))
    assert train_ids[: NUM_DOCS - k] != list(range(k, NUM_DOCS))  # shuffled
    assert data.state()["epoch"] == 1  # the stream wrapped into a second epoch


def test_fineweb_resume(jsonl_file: str, gpt2: Tokenizer) -> None:
    def fresh() -> FineWebData:
        return FineWebData(SEQ, gpt2, local_path=jsonl_file, val_rows=4, shuffle_buffer=16, seed=7)

    data = fresh()
    batches, states = {}, {}
    for step in range(60):  # 480 rows: more than one epoch of ~170 rows
        batches[step] = data.train_batch(step, 8)
        states[step] = json.loads(json.dumps(data.state()))
    assert states[20]["epoch"] == 0 and states[50]["epoch"] >= 1
    for saved in (20, 50):
        resumed = fresh()
        resumed.restore(states[saved])
        for step in range(saved + 1, saved + 6):
            np.testing.assert_array_equal(resumed.train_batch(step, 8), batches[step])
    # A state holding only the row count is honoured by re-packing from the start.
    slow = fresh()
    slow.restore({"rows_consumed": states[50]["rows_consumed"], "next_step": 51})
    np.testing.assert_array_equal(slow.train_batch(51, 8), batches[51])
    # A fresh iterator asked for a later step fast-forwards; going back raises.
    jump = fresh()
    np.testing.assert_array_equal(jump.train_batch(10, 8), batches[10])
    with pytest.raises(DataError, match="cannot go back"):
        jump.train_batch(3, 8)
    with pytest.raises(DataError, match="seq_len"):
        FineWebData(SEQ * 2, gpt2, local_path=jsonl_file, val_rows=4).restore(states[20])


@pytest.mark.parametrize("layout", ["jsonl_file", "jsonl_folder"])
def test_fineweb_processes_disjoint(layout: str, gpt2: Tokenizer, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(layout)
    seen = []
    for rank in range(2):
        data = FineWebData(
            SEQ, gpt2, local_path=path, val_rows=2, shuffle_buffer=8, process_index=rank, process_count=2
        )
        ids = _ids(gpt2, data.val_batches(2, 1)) + _ids(gpt2, [data.train_batch(0, 150)])
        seen.append(set(ids))
    assert seen[0].isdisjoint(seen[1])
    # A marker cut by the end of the validation rows may be missed: at most one document per process.
    assert len(seen[0] | seen[1]) >= NUM_DOCS - 2


def test_fineweb_errors(tmp_path: Path, jsonl_file: str, gpt2: Tokenizer) -> None:
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"content": ["a", "b"], "url": ["x", "y"]}), bad)
    with pytest.raises(DataError, match=r"no 'text' column; columns found: \['content', 'url'\]"):
        FineWebData(SEQ, gpt2, local_path=str(bad))
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"body": "a"}\n{"body": "b"}\n')
    with pytest.raises(DataError, match="body"):
        FineWebData(SEQ, gpt2, local_path=str(bad_json), val_rows=1).val_batches(1, 1)
    with pytest.raises(DataError, match="does not exist"):
        FineWebData(SEQ, gpt2, local_path=str(tmp_path / "missing.jsonl"))
    data = FineWebData(SEQ, gpt2, local_path=jsonl_file, val_rows=4)
    with pytest.raises(DataError, match="val_rows=4"):
        data.val_batches(4, 2)
    with pytest.raises(DataError, match="val_rows"):
        FineWebData(SEQ, gpt2, local_path=jsonl_file, val_rows=100_000).val_batches(1, 1)
    made = make_dataset("fineweb", SEQ, gpt2, local_path=jsonl_file, val_rows=4, shuffle_buffer=0)
    assert made.train_batch(0, 2).shape == (2, SEQ)


def test_fineweb_online_failure_and_data_folder(
    tmp_path: Path, jsonl_file: str, gpt2: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    monkeypatch.setattr(datasets, "load_dataset_builder", _no_network)
    with pytest.raises(DataError, match="HuggingFaceFW/fineweb.*network disabled.*local_path"):
        FineWebData(SEQ, gpt2, data_dir=str(tmp_path))
    # A fineweb/ folder in the data folder is used instead of the Hub.
    (tmp_path / "fineweb").mkdir()
    (tmp_path / "fineweb" / "docs.jsonl").write_bytes(Path(jsonl_file).read_bytes())
    monkeypatch.setenv("DISCRETEFLOW_DATA_DIR", str(tmp_path))
    data = FineWebData(SEQ, gpt2, val_rows=0, shuffle_buffer=0)
    assert data.train_batch(0, 2).ravel().tolist() == _stream(gpt2, _docs())[: 2 * SEQ]


def test_fineweb_hub_files_are_read_by_row_group(parquet_file: str, gpt2: Tokenizer, monkeypatch) -> None:
    import types

    import datasets

    def builder(path: str, name: str | None = None):
        assert (path, name) == ("HuggingFaceFW/fineweb", "sample-10BT")
        return types.SimpleNamespace(config=types.SimpleNamespace(data_files={"train": [parquet_file]}))

    monkeypatch.setattr(datasets, "load_dataset_builder", builder)
    data = FineWebData(SEQ, gpt2, val_rows=0, shuffle_buffer=0)
    assert data.describe_source() == "HuggingFaceFW/fineweb/sample-10BT"
    assert data.train_batch(0, 2).ravel().tolist() == _stream(gpt2, _docs())[: 2 * SEQ]


def _zero_row_groups(path: Path, groups: list[int]) -> None:
    """Overwrites the pages of the given row groups with zeros, keeping the footer: they no longer decode."""
    meta = pq.ParquetFile(path).metadata
    with open(path, "r+b") as f:
        for g in groups:
            column = meta.row_group(g).column(0)
            start = column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset
            f.seek(start)
            f.write(bytes(column.total_compressed_size))


def test_fineweb_late_resume_reads_no_skipped_document(tmp_path: Path, gpt2: Tokenizer) -> None:
    """Resuming late in an epoch reads none of the documents the saved run used up: their row groups are
    destroyed before the resume, and the resumed rows still equal the uninterrupted run's."""
    path = tmp_path / "docs.parquet"
    group, num_docs = 10, 600
    pq.write_table(pa.table({"text": _docs(num_docs)}), path, row_group_size=group, use_dictionary=False)

    def fresh() -> FineWebData:
        return FineWebData(SEQ, gpt2, local_path=str(path), val_rows=4, shuffle_buffer=16, seed=7, prefetch=0)

    data = fresh()
    saved, batch = 25, 8  # about 60% into the first epoch
    batches = []
    for step in range(saved + 4):
        batches.append(data.train_batch(step, batch))
        if step == saved:
            state = json.loads(json.dumps(data.state()))
    assert state["epoch"] == 0
    # Documents that start at least one batch before the saved position (all shorter than a batch) are used up.
    used = set(_ids(gpt2, batches[:saved]))
    assert used.isdisjoint(_ids(gpt2, batches[saved + 1 :]))
    # The first row groups stay: the validation rows are packed from the start of the shard.
    doomed = [g for g in range(8, num_docs // group) if all(d in used for d in range(g * group, (g + 1) * group))]
    assert len(doomed) >= 10, doomed
    _zero_row_groups(path, doomed)
    with pytest.raises((OSError, pa.ArrowException)):  # the destroyed row groups really cannot be read any more
        pq.read_table(path)
    resumed = fresh()
    resumed.restore(state)
    for step in range(saved + 1, saved + 4):
        np.testing.assert_array_equal(resumed.train_batch(step, batch), batches[step])


def test_fineweb_legacy_state(jsonl_file: str, gpt2: Tokenizer) -> None:
    """A position saved in the earlier buffer-shuffled order is refused, except where both orders agree."""
    shuffled = FineWebData(SEQ, gpt2, local_path=jsonl_file, val_rows=4, shuffle_buffer=16, seed=7)
    shuffled.train_batch(0, 4)
    legacy = {k: v for k, v in shuffled.state().items() if k not in ("order", "shard_docs")}
    with pytest.raises(DataError, match="'buffer' document order.*cannot be continued exactly"):
        FineWebData(SEQ, gpt2, local_path=jsonl_file, val_rows=4, shuffle_buffer=16, seed=7).restore(legacy)
    plain = FineWebData(SEQ, gpt2, local_path=jsonl_file, val_rows=4, shuffle_buffer=0)
    plain.train_batch(0, 4)
    legacy = {k: v for k, v in plain.state().items() if k not in ("order", "shard_docs")}
    expected = plain.train_batch(1, 4)
    again = FineWebData(SEQ, gpt2, local_path=jsonl_file, val_rows=4, shuffle_buffer=0)
    again.restore(legacy)
    np.testing.assert_array_equal(again.train_batch(1, 4), expected)


def test_fineweb_prefetch_is_timing_independent(jsonl_file: str, gpt2: Tokenizer) -> None:
    """Background packing gives the batches and states of on-demand packing, surfaces a worker's error with
    its message, and stops its thread on close() or when the dataset is collected."""
    import gc
    import threading
    import time

    def make(prefetch: int) -> FineWebData:
        return FineWebData(SEQ, gpt2, local_path=jsonl_file, val_rows=4, shuffle_buffer=16, seed=3, prefetch=prefetch)

    sync, ahead = make(0), make(3)
    for step in range(30):  # crosses an epoch
        if step % 7 == 0:
            time.sleep(0.05)  # let the worker run ahead
        np.testing.assert_array_equal(ahead.train_batch(step, 8), sync.train_batch(step, 8))
        assert ahead.state() == sync.state()
    # A batch size change restarts packing at the current position.
    np.testing.assert_array_equal(ahead.train_batch(30, 3), sync.train_batch(30, 3))

    def workers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "fineweb-0"]

    assert workers()
    ahead.close()
    assert not workers()
    np.testing.assert_array_equal(ahead.train_batch(31, 3), sync.train_batch(31, 3))  # restarts after close()
    del ahead
    gc.collect()
    assert not workers()

    # An error raised in the worker (a position that does not exist in this data) reaches the caller.
    state = sync.state()
    bad = make(2)
    bad.restore({**state, "offset": 10_000})
    with pytest.raises(DataError, match="Cannot resume at epoch .* token 10000"):
        bad.train_batch(state["next_step"], 3)
    assert not workers()
    bad.restore(state)
    np.testing.assert_array_equal(bad.train_batch(state["next_step"], 3), sync.train_batch(state["next_step"], 3))
    bad.close()


def test_remote_workdir_carries_its_tokenizer(tmp_path: Path, data_dir: str) -> None:
    """A gs:// workdir gets a copy of its tokenizer when training starts, and loading it fetches that
    copy to a local cache (no data folder needed). gs:// is mapped onto a local folder here."""
    from etils import epath
    from etils.epath import testing

    from discreteflow_jax.inference.load import tokenizer_folder

    bucket = tmp_path / "bucket"

    def local(path: object) -> str:
        return str(bucket / str(path).replace("gs://", ""))

    def on_local(fn, path, *args, **kwargs):
        return fn(local(path), *args, **kwargs)

    mocks = {name: on_local for name in ("open", "exists", "makedirs", "mkdir", "isdir", "listdir", "glob", "stat")}
    workdir = "gs://runs/baseline"
    with testing.mock_epath(**mocks):
        written = tokenizers_module.copy_tokenizer_files("llama", data_dir, f"{workdir}/tokenizer")
        assert written and all((bucket / "runs/baseline/tokenizer" / rel).is_file() for rel in written)

        class Cfg:  # the two fields tokenizer_folder reads
            class data:
                tokenizer = "llama"
                data_dir = ""

        cache = tmp_path / "cache"
        os.environ["HOME"], home = str(cache), os.environ.get("HOME", "")
        try:
            folder = tokenizer_folder(Cfg, None, workdir)
        finally:
            os.environ["HOME"] = home
        assert folder and folder.startswith(str(cache)), folder
        assert tokenizers_module.load_tokenizer("llama", folder).encode("To be") == \
            tokenizers_module.load_tokenizer("llama", data_dir).encode("To be")
        # A remote folder without the files is not mistaken for one that has them.
        assert tokenizers_module.local_tokenizer_copy("llama", "gs://runs/empty", str(cache)) is None
        assert not epath.Path("gs://runs/empty").exists()
