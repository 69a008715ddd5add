"""Tests for charrnn.data: vocabulary, corpora, splits and the batchers."""

import json
import os
import shutil

import numpy as np
import pytest

from charrnn import data
from charrnn.data import Batcher, DataError, Vocab

# The benchmark copy beside the repository (never inside it); tests skip without it.
SHARED_TINY = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                                           "data", "tinyshakespeare.txt"))


# --- Vocab -----------------------------------------------------------------

def test_vocab_round_trip():
    text = "hello, world\n"
    vocab = Vocab.from_text(text)
    assert vocab.chars == "\n ,dehlorw"
    assert vocab.size == 10
    ids = vocab.encode(text)
    assert ids.dtype == np.int32 and ids.shape == (len(text),)
    assert ids.tolist() == [vocab.chars.index(c) for c in text]
    assert vocab.decode(ids) == text
    assert vocab.decode(ids.tolist()) == text
    assert vocab.decode(ids.reshape(1, -1)) == text


def test_vocab_json_round_trip():
    vocab = Vocab.from_text("Ab\té—z")
    restored = Vocab.from_json(json.loads(json.dumps(vocab.to_json())))
    assert restored == vocab
    assert restored != Vocab("ab")
    assert vocab.to_json() == {"chars": "\tAbz\u00e9\u2014"}


def test_vocab_validates_chars():
    for bad in ("ba", "aab", ""):
        with pytest.raises(DataError):
            Vocab(bad)
    with pytest.raises(DataError):
        Vocab.from_json({"letters": "ab"})


def test_encode_names_unknown_characters():
    vocab = Vocab("abc")
    with pytest.raises(DataError) as info:
        vocab.encode("a\té\tbé")
    assert str(info.value) == "text has characters not in the vocabulary: '\\t', 'é'"
    with pytest.raises(DataError) as info:  # another script: counted, the first 10 shown
        vocab.encode("".join(map(chr, range(0x4E00, 0x4E00 + 6000))))
    assert str(info.value) == ("text has characters not in the vocabulary: 6000 of them, the "
                               "first 10: " + ", ".join(repr(chr(0x4E00 + i)) for i in range(10)))


def test_decode_rejects_out_of_range_ids():
    with pytest.raises(DataError):
        Vocab("ab").decode([0, 2])


# --- load_text: files --------------------------------------------------------

def test_load_text_from_path(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("To be, or not\n", encoding="utf-8")
    assert data.load_text(name="no-such-corpus", path=str(f)) == "To be, or not\n"
    f.write_bytes("caf\u00e9".encode("latin-1"))
    assert data.load_text(path=str(f), encoding="latin-1") == "caf\u00e9"


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("directory", "is a directory"),
    ("empty", "is empty"),
    ("latin1", "is not valid utf-8 at byte offset 3; pass its encoding with "
               "--config.data.encoding"),
])
def test_load_text_file_errors(tmp_path, case, message):
    path = tmp_path / "t.txt"
    if case == "directory":
        path = tmp_path
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "latin1":
        path.write_bytes(b"caf\xe9 au lait")
    with pytest.raises(DataError, match=message) as info:
        data.load_text(path=str(path))
    assert "\n" not in str(info.value)


def test_load_text_unknown_name():
    with pytest.raises(DataError, match="known names: shakespeare, tinyshakespeare"):
        data.load_text("hamlet")


# --- load_text: built-in corpora ---------------------------------------------

def test_builtin_shakespeare():
    text = data.load_text("shakespeare")
    assert len(text) > 4_000_000
    assert "\nHAMLET:\nTo be, or not to be: that is the question:\n" in text
    for artifact in ("**", "_", "\\", "#", "[", "  \n"):
        assert artifact not in text
    assert "\n\n\n" not in text
    assert data.load_text() == text  # default name; deterministic


def test_tinyshakespeare_from_cache(tmp_path):
    if not os.path.exists(SHARED_TINY):
        pytest.skip("shared tinyshakespeare.txt not available")
    shutil.copy(SHARED_TINY, tmp_path / "tinyshakespeare.txt")
    text = data.load_text("tinyshakespeare", cache_dir=str(tmp_path))
    assert len(text) == 1_115_394
    assert text.startswith("First Citizen:\nBefore we proceed any further")


def test_tinyshakespeare_cache_from_env(tmp_path, monkeypatch):
    if not os.path.exists(SHARED_TINY):
        pytest.skip("shared tinyshakespeare.txt not available")
    shutil.copy(SHARED_TINY, tmp_path / "tinyshakespeare.txt")
    monkeypatch.setenv("CHARRNN_CACHE", str(tmp_path))
    assert len(data.load_text("tinyshakespeare")) == 1_115_394


def test_tinyshakespeare_checksum_mismatch(tmp_path):
    (tmp_path / "tinyshakespeare.txt").write_text("not the real thing\n")
    with pytest.raises(DataError, match="wrong sha256"):
        data.load_text("tinyshakespeare", cache_dir=str(tmp_path))


def test_tinyshakespeare_offline(tmp_path, monkeypatch):
    url = "http://127.0.0.1:9/input.txt"
    monkeypatch.setattr(data, "TINYSHAKESPEARE_URL", url)
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="could not download tinyshakespeare from "
                                        "http://127.0.0.1:9/input.txt .*offline.*data.path"):
        data.load_text("tinyshakespeare", cache_dir=str(cache))
    assert not (cache / "tinyshakespeare.txt").exists()


def test_tinyshakespeare_download_verifies_checksum(tmp_path, monkeypatch):
    # A file:// URL stands in for the network: the download path runs end to end.
    source = tmp_path / "input.txt"
    source.write_text("wrong text\n")
    monkeypatch.setattr(data, "TINYSHAKESPEARE_URL", source.as_uri())
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="wrong sha256"):
        data.load_text("tinyshakespeare", cache_dir=str(cache))
    assert os.listdir(cache) == []  # nothing partial or wrong left behind
    if os.path.exists(SHARED_TINY):
        monkeypatch.setattr(data, "TINYSHAKESPEARE_URL", "file://" + os.path.abspath(SHARED_TINY))
        assert len(data.load_text("tinyshakespeare", cache_dir=str(cache))) == 1_115_394
        assert os.listdir(cache) == ["tinyshakespeare.txt"]


# --- split ------------------------------------------------------------------

def test_split_contiguous():
    ids = np.arange(100, dtype=np.int32)
    train, val, test = data.split(ids, 0.1, 0.05)
    assert (len(train), len(val), len(test)) == (85, 10, 5)
    assert np.array_equal(np.concatenate([train, val, test]), ids)
    train, val, test = data.split(ids, 0.0, 0.0)
    assert len(train) == 100 and len(val) == 0 and len(test) == 0


def test_split_rounds():
    train, val, test = data.split(np.arange(10), 0.25, 0.14)  # 2.5 -> 2, 1.4 -> 1
    assert (len(train), len(val), len(test)) == (7, 2, 1)


def test_split_errors():
    with pytest.raises(DataError, match="leave no training text"):
        data.split(np.arange(10), 0.5, 0.5 - 1e-9)
    for bad in (-0.1, 1.0):
        with pytest.raises(DataError, match="val_fraction"):
            data.split(np.arange(10), bad, 0.0)


# --- Batcher ------------------------------------------------------------------

def _drain(batcher, n):
    return [batcher.next() for _ in range(n)]


def test_batcher_windows_are_text_shifted_by_one():
    ids = np.arange(1000, dtype=np.int32)  # id == position, so rows show offsets
    batcher = Batcher(ids, batch_size=4, seq_len=8, seed=0)
    for x, y, _ in _drain(batcher, 3 * batcher.windows_per_epoch):
        assert x.shape == y.shape == (4, 8) and x.dtype == y.dtype == np.int32
        assert np.array_equal(y[:, :-1], x[:, 1:])
        # Each row is a contiguous piece of the text, and y is x + 1 in it.
        assert np.array_equal(x, x[:, :1] + np.arange(8))
        assert np.array_equal(y, x + 1)
        assert y.max() < len(ids)


def test_batcher_rows_match_text():
    text = "the quick brown fox jumps over the lazy dog. " * 10
    vocab = Vocab.from_text(text)
    batcher = Batcher(vocab.encode(text), batch_size=3, seq_len=5, seed=1)
    for x, y, _ in _drain(batcher, 10):
        for row_x, row_y in zip(x, y):
            assert vocab.decode(row_x) + vocab.decode(row_y[-1:]) in text
            assert vocab.decode(row_x)[1:] + vocab.decode(row_y[-1:]) == vocab.decode(row_y)


def test_batcher_layout_and_reset():
    ids = np.arange(1000, dtype=np.int32)
    batcher = Batcher(ids, batch_size=4, seq_len=8, seed=0)
    # L = (1000 - 8) // 4 = 248, rounded down to 248 (31 windows of 8).
    assert batcher.windows_per_epoch == 31
    windows = _drain(batcher, 2 * 31 + 1)
    resets = [reset for _, _, reset in windows]
    assert resets == [True] + [False] * 30 + [True] + [False] * 30 + [True]
    for epoch in range(2):
        epoch_windows = windows[31 * epoch: 31 * (epoch + 1)]
        offset = epoch_windows[0][0][0, 0]
        assert 0 <= offset < 8
        # Stream b starts at offset + b*L.
        assert np.array_equal(epoch_windows[0][0][:, 0], offset + 248 * np.arange(4))
        for (x0, y0, _), (x1, _, _) in zip(epoch_windows, epoch_windows[1:]):
            assert np.array_equal(x1[:, 0], y0[:, -1])  # streams continue across windows


def test_batcher_offsets_differ_between_epochs():
    ids = np.arange(500, dtype=np.int32)
    batcher = Batcher(ids, batch_size=2, seq_len=16, seed=0)
    offsets = [x[0, 0] for x, _, reset in _drain(batcher, 10 * batcher.windows_per_epoch)
               if reset]
    expected = [np.random.default_rng([0, e]).integers(16) for e in range(10)]
    assert offsets == expected
    assert len(set(offsets)) > 1


def test_batcher_deterministic_from_seed():
    ids = np.random.default_rng(0).integers(0, 50, 3000).astype(np.int32)
    run = lambda seed: _drain(Batcher(ids, 4, 16, seed=seed), 200)
    a, b, c = run(7), run(7), run(8)
    assert all(np.array_equal(p[0], q[0]) and np.array_equal(p[1], q[1]) and p[2] == q[2]
               for p, q in zip(a, b))
    assert any(not np.array_equal(p[0], q[0]) for p, q in zip(a, c))


def test_batcher_state_dict_resumes_identically():
    ids = np.random.default_rng(1).integers(0, 50, 2000).astype(np.int32)
    reference = Batcher(ids, 3, 10, seed=5)
    wpe = reference.windows_per_epoch
    assert reference.state_dict() == {"epoch": 0, "window": 0}
    _drain(reference, wpe + 3)
    state = json.loads(json.dumps(reference.state_dict()))
    assert state == {"epoch": 1, "window": 3}
    expected = _drain(reference, 2 * wpe)

    resumed = Batcher(ids, 3, 10, seed=5)
    resumed.load_state_dict(state)
    got = _drain(resumed, 2 * wpe)
    for (xe, ye, re_), (xg, yg, rg) in zip(expected, got):
        assert np.array_equal(xe, xg) and np.array_equal(ye, yg) and re_ == rg

    with pytest.raises(DataError):
        resumed.load_state_dict({"epoch": 0, "window": wpe})
    with pytest.raises(DataError):
        resumed.load_state_dict({"epoch": 0})


def test_batcher_state_after_last_window_is_next_epoch():
    batcher = Batcher(np.arange(100, dtype=np.int32), 2, 5, seed=0)
    _drain(batcher, batcher.windows_per_epoch)
    assert batcher.state_dict() == {"epoch": 1, "window": 0}


def test_batcher_minimal_text_never_overruns():
    # N = B*T + 1 is the shortest text allowed: one window per stream.
    for n in range(4 * 8 + 1, 6 * 8 + 2):
        ids = np.arange(n, dtype=np.int32)
        batcher = Batcher(ids, batch_size=4, seq_len=8, seed=3)
        for x, y, _ in _drain(batcher, 20 * batcher.windows_per_epoch):
            assert np.array_equal(y, x + 1) and y.max() < n


def test_batcher_errors():
    with pytest.raises(DataError, match="the text has 32 characters but "
                                        "batch_size\\*seq_len\\+1 = 33 are needed"):
        Batcher(np.arange(32), batch_size=4, seq_len=8, seed=0)
    for b, t in ((0, 8), (4, 0), (-1, 8)):
        with pytest.raises(DataError):
            Batcher(np.arange(1000), batch_size=b, seq_len=t, seed=0)


# --- eval_windows -----------------------------------------------------------------

@pytest.mark.parametrize("burn_in", [0, 5, 1000])
@pytest.mark.parametrize("n, b, t", [(2, 1, 1), (2, 4, 3), (100, 4, 8), (101, 4, 8),
                                     (97, 3, 5), (10, 16, 4), (33, 4, 8)])
def test_eval_windows_cover_every_prediction_once(n, b, t, burn_in):
    ids = np.arange(n, dtype=np.int32)  # id == position
    windows = list(data.eval_windows(ids, b, t, burn_in))
    covered = np.zeros(n, int)
    for x, y, mask in windows:
        assert x.shape == y.shape == mask.shape == (b, t)
        assert x.dtype == y.dtype == np.int32 and mask.dtype == np.float32
        real = mask == 1
        assert set(np.unique(mask)) <= {0.0, 1.0}
        assert np.array_equal(y[real], x[real] + 1)  # consecutive pairs of the text
        np.add.at(covered, y[real], 1)
    assert sum(m.sum() for _, _, m in windows) == n - 1
    assert covered[0] == 0 and np.all(covered[1:] == 1)
    # Each row reads the text contiguously across windows (so carried state is valid):
    # first min(burn_in, start) unscored characters, then its scored stream, then padding.
    stream_x = np.concatenate([x for x, _, _ in windows], axis=1)
    stream_m = np.concatenate([m for _, _, m in windows], axis=1)
    for row_x, row_m in zip(stream_x, stream_m):
        scored = np.flatnonzero(row_m)
        if not len(scored):
            continue
        start = row_x[scored[0]]  # the first scored position of this stream
        burn = min(burn_in, start)
        assert scored[0] == burn and row_x[0] == start - burn
        read = row_x[:scored[-1] + 1]
        assert np.array_equal(read, read[0] + np.arange(len(read)))
        assert np.all(row_m[burn:scored[-1] + 1] == 1)


def test_eval_windows_without_burn_in_are_b_cold_streams():
    """burn_in=0: stream b starts at b*ceil((N-1)/B) in column 0, from the zero state."""
    windows = list(data.eval_windows(np.arange(101, dtype=np.int32), 4, 8, burn_in=0))
    x = np.concatenate([w[0] for w in windows], axis=1)
    assert x.shape == (4, 32) and list(x[:, 0]) == [0, 25, 50, 75]


def test_eval_windows_too_short():
    with pytest.raises(DataError):
        list(data.eval_windows(np.arange(1), 2, 4))
    with pytest.raises(DataError):
        list(data.eval_windows(np.arange(10), 2, 4, burn_in=-1))
