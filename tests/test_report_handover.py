"""REPORT.md §3.1 (experiments/pages/report_handover.py): the hand-over measures of two
trained regimes, on hand-made numbers; the whole step runs in test_report_smoke.py."""

import jax
import numpy as np

from charrnn import data, models
from charrnn import step as step_lib
from conftest import _SPEECH
from experiments.pages import report_handover as handover


def test_meets_is_the_first_position_from_which_the_gap_stays_small():
    se0 = np.zeros(4)
    assert handover.meets(np.array([0.5, 0.3, 0.01, 0.0]), se0) == 3
    assert handover.meets(np.array([0.5, 0.01, 0.3, 0.0]), se0) == 4  # must stay inside
    assert handover.meets(np.array([0.0, 0.0, 0.0, 0.0]), se0) == 1
    assert handover.meets(np.array([0.0, 0.0, 0.0, 0.5]), se0) is None
    assert handover.meets(np.array([0.0, -0.5, 0.0, 0.0]), se0) == 3  # |gap|: below counts too
    # two standard errors widen the band: 0.1 <= 2 * 0.06, 0.1 > 2 * 0.04
    assert handover.meets(np.array([0.5, 0.1, 0.0]), np.array([0.0, 0.06, 0.0])) == 2
    assert handover.meets(np.array([0.5, 0.1, 0.0]), np.array([0.0, 0.04, 0.0])) == 3


def test_stream_starts_counts_epoch_starts_or_the_logged_restarts():
    # no restart_fraction (reset_prob 0): B streams at windows 0, W, 2W, ... below the steps
    assert handover.stream_starts([], 4, 1050, 2000) == 8
    assert handover.stream_starts([], 4, 1050, 1050) == 4
    assert handover.stream_starts([], 4, 1050, 1051) == 8
    records = [{"split": "train", "step": 50, "restart_fraction": 0.05},
               {"split": "val", "step": 50},
               {"split": "train", "step": 100, "restart_fraction": 0.02},
               {"split": "train", "step": 120, "restart_fraction": 0.25}]
    assert np.isclose(handover.stream_starts(records, 4, 1050, 120),
                      4 * (50 * 0.05 + 50 * 0.02 + 20 * 0.25))


def _raw(gap, context, row_loss, samples=("ab c",)):
    """One regime's raw measures: nll_context [K, L] and nll_start = context + gap."""
    return {"step": 20, "start_state": "zero", "reset_prob": 0.0, "val_loss": 1.0,
            "samples": list(samples), "sample_length": 4, "batch_size": 4,
            "windows_per_epoch": 10, "stream_starts": 8.0,
            "nll_start": context + gap, "nll_context": context, "row_loss": np.asarray(row_loss)}


def test_summarize_on_hand_made_losses(tmp_path):
    K, L = 4, 20  # L > START_CHARS = 16
    context = np.full((K, L), 1.5)
    old_gap = np.zeros((K, L))
    old_gap[:, :8] = 1.0  # 1 nat/char for 8 positions, then none: meets at 9
    new_gap = np.zeros((K, L))
    new_gap[:, :2] = np.array([[0.2], [0.4], [0.2], [0.4]])  # mean 0.3, rows differ
    h = handover.summarize({
        "carried": _raw(old_gap, context, [2.0, 2.1, 2.2], samples=("ab$", "c d")),
        "restarts": _raw(new_gap, context, [1.9, 2.2, 2.2])})
    old, new = h["regimes"]["carried"], h["regimes"]["restarts"]
    assert np.isclose(old["start_gap"], 8 / 16) and np.isclose(old["start_loss"], 1.5 + 0.5)
    assert np.isclose(new["start_gap"], 2 * 0.3 / 16)
    assert old["meets"] == 9 and old["gap_se"][0] == 0
    # position 2's gaps 0.2, 0.4, 0.2, 0.4: mean 0.3, se = std / 2 = 0.1155 / 2 < 0.3 / 2
    assert np.isclose(new["gap_se"][1], np.std([0.2, 0.4, 0.2, 0.4], ddof=1) / 2)
    assert new["meets"] == 3
    assert np.isclose(old["plain_share"], 5 / 6)  # "$" is not a plain character
    # paired differences restarts - carried: val per stream (-0.1, 0.1, 0)
    assert np.isclose(h["val_diff"]["mean"], 0) and h["val_diff"]["n"] == 3
    assert np.isclose(h["val_diff"]["se"], np.std([-0.1, 0.1, 0], ddof=1) / np.sqrt(3))
    per_line = 2 * np.array([0.2, 0.4, 0.2, 0.4]) / 16 - 0.5
    assert np.isclose(h["gap_diff"]["mean"], per_line.mean())
    text = handover.section(h, "fig")
    assert f"Restarts narrow it by {handover.fmt(-per_line.mean())} nats/char" in text
    assert "within two standard errors of the evaluation text's own noise" in text
    assert "seed 1:\nc d\n" in text and "](fig/handover.png)" in text
    assert "the same budget (20 steps of 4 streams, the same seed)" in text
    assert "(start_state zero, reset_prob 0: NOT today's defaults," in text  # they restart
    assert "carried: from position 9; restarts: from position 3. The first character after " \
        "the newline alone has a gap of 1 nats/char carried and 0.3 with restarts." in text
    assert handover.glance(h) == (
        "; at the start of a text (the first 16 characters after a line start, from the start "
        f"state) the model loses {handover.fmt(0.6 / 16)} nats/char against reading in context "
        "when training restarted its streams, 0.5 when it carried the state (§3.1)")
    handover._plot(tmp_path / "handover.png", h["regimes"])
    assert (tmp_path / "handover.png").stat().st_size > 0


def test_summarize_says_when_nothing_moved_and_when_nothing_can_be_measured():
    K, L = 4, 20
    context = np.full((K, L), 1.5)
    gap = np.zeros((K, L))
    gap[:, -1] = [0.5, 0.7, 0.5, 0.7]  # the last position outside: never meets
    h = handover.summarize({"carried": _raw(gap, context, [2.0, 2.1, 2.2]),
                            "restarts": _raw(gap, context, [2.5, 2.6, 2.7])})
    text = handover.section(h, "fig")
    assert "no measurable change" in text
    assert "carried: not within the 20 positions measured" in text
    assert "beyond two standard errors" in text  # every stream 0.5 worse: se 0
    none = dict(_raw(gap, context, [2.0]), nll_start=None, nll_context=None)
    h = handover.summarize({"carried": none, "restarts": none})
    assert "gap_diff" not in h
    assert "no line start to measure" in handover.section(h, "fig") and handover.glance(h) == ""


def test_row_losses_add_up_to_the_val_loss_of_training():
    """The per-stream totals the val comparison pairs sum to charrnn.step.evaluate's loss."""
    text = _SPEECH * 3
    vocab = data.Vocab.from_text(text)
    ids = vocab.encode(text)
    model = models.CharRNN(vocab.size, cell="rnn", hidden_size=8, num_layers=1, embed_dim=4)
    params = model.init(jax.random.key(0))

    class Config:
        class train:
            eval_batch_size, seq_len = 3, 16
    total, count = handover._row_losses(model, params, ids, Config)
    expected = step_lib.evaluate(step_lib.make_eval_step(model), model, params, ids, 3, 16)
    assert count.sum() == len(ids) - 1 and len(total) == 3
    assert np.isclose(total.sum() / count.sum(), expected["loss"], rtol=1e-6)
