"""Cost of resuming the FineWeb stream late in an epoch, and time the train loop waits for its batches.

    python benchmarks/fineweb_resume.py [--docs=400000] [--positions=0.1,0.5,0.95] [--out=FILE]

Builds (once, in --fixture_dir) a local parquet corpus of synthetic documents (``text`` column, row groups of
--row_group documents), then for each position (a fraction of the epoch's training documents) times a fresh
``FineWebData``: opening the corpus and packing the validation rows (``open_s``), then ``restore`` of a state
pointing at that document and the first training batch (``resume_first_batch_s``). A second part takes
--steps batches with a simulated train step of --step_ms in between and reports the mean time
``train_batch`` blocked (``wait_ms``), with and without background packing when the code has it. GPT-2 BPE
from the data folder (--data_dir, default: shared/data next to the repository). JSON to stdout.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_info, emit_json  # noqa: E402

from discreteflow_jax.data import FineWebData, load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_DOCS = flags.DEFINE_integer("docs", 400_000, "Documents in the synthetic corpus.")
_WORDS = flags.DEFINE_integer("words", 60, "Mean words per document.")
_ROW_GROUP = flags.DEFINE_integer("row_group", 1000, "Documents per parquet row group.")
_FIXTURE_DIR = flags.DEFINE_string("fixture_dir", "/tmp/fineweb_resume_fixture", "Where the corpus is written.")
_DATA_DIR = flags.DEFINE_string("data_dir", os.path.join(os.path.dirname(REPO), "shared", "data"), "Data folder.")
_POSITIONS = flags.DEFINE_list("positions", ["0.1", "0.5", "0.95"], "Resume points, fractions of the epoch.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 1024, "Tokens per row.")
_BATCH = flags.DEFINE_integer("batch", 8, "Rows per batch.")
_VAL_ROWS = flags.DEFINE_integer("val_rows", 16, "Validation rows.")
_SHUFFLE = flags.DEFINE_integer("shuffle_buffer", 10_000, "shuffle_buffer of FineWebData.")
_STEPS = flags.DEFINE_integer("steps", 30, "Batches taken in the wait measurement (0 skips it).")
_STEP_MS = flags.DEFINE_float("step_ms", 100.0, "Simulated train-step time between batches.")
_OUT = flags.DEFINE_string("out", None, "Also write the JSON report here.")

_VOCAB = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have "
          "an they you were her she there been one all we their has would when if so no will more its who out up "
          "about into them than can only other time new some could these two may first then do any like my now "
          "over such our man me even most made after also did many off before must well back through years much "
          "where your way down should because each just those people how too little state good very make world").split()


def build_fixture() -> str:
    path = os.path.join(_FIXTURE_DIR.value, f"docs{_DOCS.value}_w{_WORDS.value}_g{_ROW_GROUP.value}.parquet")
    if os.path.exists(path):
        return path
    os.makedirs(_FIXTURE_DIR.value, exist_ok=True)
    rng = np.random.default_rng(0)
    lengths = rng.integers(_WORDS.value // 4, _WORDS.value * 7 // 4, size=_DOCS.value)
    words = np.asarray(_VOCAB)[rng.integers(len(_VOCAB), size=int(lengths.sum()))]
    ends = np.cumsum(lengths)
    texts = [f"document {i}: " + " ".join(words[e - n : e]) for i, (n, e) in enumerate(zip(lengths, ends))]
    tmp = path + ".tmp"
    pq.write_table(pa.table({"text": texts}), tmp, row_group_size=_ROW_GROUP.value)
    os.replace(tmp, path)
    return path


def make_data(path: str, tokenizer, prefetch: int | None) -> FineWebData:
    kwargs = {"prefetch": prefetch} if prefetch is not None else {}
    return FineWebData(_SEQ_LEN.value, tokenizer, local_path=path, val_rows=_VAL_ROWS.value,
                       shuffle_buffer=_SHUFFLE.value, **kwargs)


def resume_point(path: str, tokenizer, fraction: float) -> dict:
    start = time.perf_counter()
    data = make_data(path, tokenizer, None)
    data.check_readable()  # packs the validation rows, as training does before its first step
    val_docs = data.num_val_docs
    opened = time.perf_counter()
    doc = int(fraction * (_DOCS.value - val_docs))
    step = 1000
    data.restore({**data.state(), "epoch": 0, "doc": doc, "offset": 0, "rows_consumed": 0, "next_step": step})
    batch = data.train_batch(step, _BATCH.value)
    done = time.perf_counter()
    assert batch.shape == (_BATCH.value, _SEQ_LEN.value)
    getattr(data, "close", lambda: None)()
    return {"fraction": fraction, "doc": doc, "open_s": round(opened - start, 3),
            "resume_first_batch_s": round(done - opened, 3)}


def waits(path: str, tokenizer, prefetch: int | None) -> dict:
    data = make_data(path, tokenizer, prefetch)
    data.check_readable()
    data.train_batch(0, _BATCH.value)  # the first batch pays for opening the stream: not a steady-state wait
    blocked = []
    for step in range(1, _STEPS.value + 1):
        time.sleep(_STEP_MS.value / 1000)
        start = time.perf_counter()
        data.train_batch(step, _BATCH.value)
        blocked.append(time.perf_counter() - start)
    getattr(data, "close", lambda: None)()
    return {"prefetch": prefetch, "wait_ms_mean": round(1000 * float(np.mean(blocked)), 2),
            "wait_ms_max": round(1000 * float(np.max(blocked)), 2)}


def main(argv: list[str]) -> None:
    del argv
    t0 = time.perf_counter()
    path = build_fixture()
    print(f"fixture {path} ready in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    tokenizer = load_tokenizer("gpt2", _DATA_DIR.value)
    has_prefetch = "prefetch" in inspect.signature(FineWebData).parameters
    report: dict = {
        **cpu_info(),
        "has_prefetch": has_prefetch,
        "fixture": {"docs": _DOCS.value, "row_group": _ROW_GROUP.value, "mb": round(os.path.getsize(path) / 2**20, 1)},
        "seq_len": _SEQ_LEN.value, "batch": _BATCH.value, "shuffle_buffer": _SHUFFLE.value,
        "resume": [],
    }
    # Untimed: the first open pays for imports and file-system caches, which are not the cost of resuming.
    resume_point(path, tokenizer, 0.0)
    for fraction in _POSITIONS.value:
        report["resume"].append(resume_point(path, tokenizer, float(fraction)))
        print(json.dumps(report["resume"][-1]), file=sys.stderr)
    if _STEPS.value:
        report["step_ms"] = _STEP_MS.value
        report["waits"] = [waits(path, tokenizer, p) for p in ((0, 2) if has_prefetch else (None,))]
    emit_json(report, _OUT.value)


if __name__ == "__main__":
    app.run(main)
