"""The report's finding sentences are chosen by the numbers: contrary synthetic results
must give contrary sentences (experiments/pages/report_sections.py, report_rules.py,
report_ablation.py)."""

import math

from experiments.pages import report_ablation, report_rules, report_sections


def test_explosion_sentences_follow_the_measured_slopes():
    good = report_sections._explosion_finding(1e-6, 0.98, True)
    assert "never exceeds the bound" in good and "0.9800" in good
    assert "to within 1.0e-06" in good and "necessary for explosion" in good
    bad = report_sections._explosion_finding(0.2, 1.3, False)
    assert "EXCEEDS the bound" in bad and "1.3000" in bad and "NOT the exact agreement" in bad
    assert "never exceeds" not in bad and "NOT below" in bad


def _cos(mode, cosine):
    return {"mode": mode, "cosine": cosine}


def test_direction_sentence_follows_the_cosines():
    usual = report_sections._direction_finding([_cos("global_norm", 1.0), _cos("value", 0.71),
                                                _cos("agc", 0.93)])
    assert "keeps the direction" in usual and "turn it (value 0.7100, agc 0.9300)" in usual
    contrary = report_sections._direction_finding([_cos("global_norm", 0.9),
                                                   _cos("value", 1.0)])
    assert "turned the direction here" in contrary and "did not turn it" in contrary
    assert "keeps the direction" not in contrary


def test_clip_activity_sentence_follows_the_clip_fraction():
    cfg = {"optim": {"clip_norm": 0.3}}
    recs = [{"clip_fraction": f, "grad_norm": g} for f, g in [(0.6, 0.35), (0.4, 0.3), (0.2, 0.28)]]
    active = report_sections._clip_activity(cfg, recs)
    assert "rescaled 40% of all steps (60% in the first record, 20% in the last)" in active
    idle = report_sections._clip_activity(
        cfg, [{"clip_fraction": 0.0, "grad_norm": 0.1} for _ in range(3)])
    assert "never acted" in idle and "rescaled" not in idle


def _row(cell, opt, rule, label, bpc, std=0.01, diverged=0, seeds=3):
    return {"cell": cell, "optimizer": opt, "rule": rule, "threshold": label, "seeds": seeds,
            "final_val_bpc": bpc, "final_val_bpc_std": std, "diverged": diverged}


def _table(sgd_bpcs, adam_bpcs, std=0.01):
    """rnn only; per optimizer: {(rule, label): mean final bpc} (None: diverged)."""
    rows = []
    for opt, bpcs in (("sgd", sgd_bpcs), ("adam", adam_bpcs)):
        for (rule, label), bpc in bpcs.items():
            rows.append(_row("rnn", opt, rule, label, math.inf if bpc is None else bpc, std,
                             diverged=3 if bpc is None else 0))
    return rows


def test_rule_comparison_sentences_follow_the_numbers():
    sgd = {("none", "none"): None, ("global_norm", "1x"): 2.0, ("value", "0.01"): 2.5}
    adam = {("none", "none"): 2.05, ("global_norm", "1x"): 2.04, ("zclip", "2.5"): 2.00}
    ws = report_rules.winners(_table(sgd, adam))
    by_opt = {w["optimizer"]: w for w in ws}
    assert by_opt["sgd"]["best"]["rule"] == "global_norm"
    assert by_opt["adam"]["best"]["rule"] == "zclip"
    assert by_opt["adam"]["runner_up"]["rule"] == "global_norm"
    assert by_opt["sgd"]["diverged"] == {"none": 3}
    line = report_rules._winner_line(by_opt["sgd"])
    assert "best global_norm 1x at 2" in line and "0.500 bpc behind, larger than" in line
    single = report_rules._winner_line(report_rules.winners(
        [{**r, "seeds": 1} for r in _table(sgd, adam)])[1])
    assert "one seed: no spread" in single
    assert "without clipping 3/3 seeds diverged" in line and "diverged runs: none 3" in line
    # Adam's 0.04 lead is within a 0.05 std; SGD's 0.5 spread > Adam's 0.05
    close = report_rules._winner_line(report_rules.winners(_table(sgd, adam, std=0.05))[0])
    assert "within the seeds' spread" in close
    finding = report_rules._optimizer_finding(ws)
    assert "SGD against Adam: tanh RNN 0.500 / 0.050" in finding
    assert "mattered less with Adam on every cell" in finding
    assert "Diverged runs, by rule: none 3; every other rule" in finding
    wins = report_rules._rule_wins(ws)
    assert "with sgd global_norm wins on every cell" in wins
    # contrary: Adam's settings far apart, SGD's close
    ws2 = report_rules.winners(_table({("global_norm", "1x"): 2.0, ("value", "0.01"): 2.01},
                                      {("global_norm", "1x"): 2.0, ("zclip", "2.5"): 2.9}))
    contrary = report_rules._optimizer_finding(ws2)
    assert "mattered less with Adam on no cell" in contrary
    assert "No run diverged under any rule" in contrary
    assert "no run diverged" in report_rules._winner_line(ws2[0])


def test_plateau_sentence_follows_the_gain():
    p = {"rule": "zclip", "threshold": "2.5", "seed": 0, "steps": 2000, "long_steps": 4000,
         "bpc_at_steps": 2.10, "grid_bpc_at_steps": 2.10, "best_bpc_long": 2.08, "gain": 0.02}
    assert "within the 0.05 bpc" in report_rules._plateau(p)
    still = report_rules._plateau({**p, "best_bpc_long": 1.9, "gain": 0.2})
    assert "still learning" in still and "within the" not in still
    assert report_rules._plateau(None) == ""


def test_optimizer_contrast_says_nearly_every_gradient_only_when_it_is():
    def table(adam_fraction):
        rows = []
        for opt, frac in (("sgd", 0.5), ("adam", adam_fraction)):
            for label, bpc in (("none", 2.3), ("0.5x", 2.1), ("2x", 2.2)):
                rows.append({**_row("rnn", opt, "global_norm" if label != "none" else "none",
                                    label, bpc), "best_val_bpc": bpc,
                             "clip_fraction": frac if label == "0.5x" else 0.0})
        return rows

    def contrast(rows):
        """clip_ablation.optimizer_contrast's shape, by hand: spread, clip fraction per threshold."""
        out = {}
        for opt in ("sgd", "adam"):
            rs = [r for r in rows if r["optimizer"] == opt]
            bpcs = [r["final_val_bpc"] for r in rs]
            out[("rnn", opt)] = {"spread": max(bpcs) - min(bpcs),
                                 "clip_fraction": {r["threshold"]: r["clip_fraction"] for r in rs}}
        return out

    for fraction, says in ((0.97, True), (0.3, False)):
        rows = table(fraction)
        text = report_ablation._contrast_text(contrast(rows), rows)
        assert ("nearly a rescaling of every gradient" in text) is says
        assert f"rescaled {100 * fraction:.0f}% of Adam's steps" in text


def _answers_results(linear_slope_sign, unclipped_jump, smooth_r, sgd_winner):
    from test_cliff import _synthetic
    slopes = [{"ln_rho": math.log(rho), "linear_slope": linear_slope_sign * math.log(rho)}
              for rho in (0.5, 1.5)]
    fit = {"slope": 1.0, "pearson_r": smooth_r, "n": 300}
    sgd = {("none", "none"): None, ("global_norm", "1x"): 2.0, ("value", "0.01"): 2.5}
    if sgd_winner == "value":
        sgd[("value", "0.01")] = 1.9
    return {"exploding": {"slopes": slopes},
            "cliff": _synthetic(unclipped_jump, 0.5, 1),
            "smoothness": {"studies": {"adam": {"fit": fit}}},
            "ablation": {"rules_table": _table(sgd, {("global_norm", "1x"): 2.0})},
            "lm": {"records": [{"split": "train", "clip_fraction": 0.25}]},
            "handover": {"gap_diff": {}, "start_chars": 16,
                         "regimes": {"carried": {"start_gap": 0.228},
                                     "restarts": {"start_gap": 0.136}}},
            "placement": {"table": [_placed("gradient", 2.5), _placed("update", 2.505),
                                    _placed("bptt", 2.3), _placed("example", 2.6, 2)]}}


def _placed(clip_at, bpc, diverged=0):
    """A placement study's table entry (rnn, sgd, lr 1, global_norm, 3 seeds, std 0.01)."""
    return {"cell": "rnn", "optimizer": "sgd", "learning_rate": 1.0, "clip_at": clip_at,
            "rule": "global_norm", "setting": f"global_norm @ {clip_at}", "seeds": 3,
            "diverged": diverged, "final_val_bpc": bpc, "final_val_bpc_std": 0.01,
            "unit_clip_fraction": 0.5}


def test_the_answers_at_a_glance_follow_the_numbers():
    usual = report_sections.section_answers(_answers_results(1, 84.6, 0.9, "global_norm"))
    assert "grows as ρ^k exactly when" in usual
    assert "jumped up to 169× the clipped bound" in usual
    assert "smoothness grew with the gradient norm under Adam (slope 1.00, r 0.90)" in usual
    assert "with sgd: tanh RNN global_norm 1x (2.000 bpc)" in usual
    assert "diverged runs: 3 with SGD" in usual and "rescaled\n   25% of the steps" in usual
    assert "the model loses 0.136 nats/char against reading in context when training " \
        "restarted its streams, 0.228 when it carried the state (§3.1)." in usual
    contrary = report_sections.section_answers(_answers_results(-1, 0.3, 0.05, "value"))
    assert "did NOT grow with ρ > 1" in contrary
    assert "clipping did not separate the step lengths" in contrary
    assert "did not grow with the gradient norm under Adam" in contrary
    assert "with sgd: tanh RNN value 0.01 (1.900 bpc)" in contrary
    assert ("it changed the outcome in 2 of 3 comparisons with the same rule on the gradient "
            "(1 of them in which seeds diverged) (§2.5)") in " ".join(usual.split())
    no_lines = dict(_answers_results(1, 84.6, 0.9, "global_norm"), handover={}, placement={})
    assert "learns\n   nothing (§3).\n" in report_sections.section_answers(no_lines)
    assert "rescaled\n   25% of the steps.\n" in report_sections.section_answers(no_lines)


def test_the_noise_floor_is_the_gap_of_settings_that_never_clipped():
    rows = [dict(_row("lstm", "adam", "none", "none", 2.455), clip_fraction=0.0),
            dict(_row("lstm", "adam", "global_norm", "16x", 2.487), clip_fraction=0.0),
            dict(_row("lstm", "adam", "global_norm", "0.25x", 2.40), clip_fraction=1.0)]
    floor = report_rules.noise_floor(rows)
    assert floor["count"] == 1 and abs(floor["gap"] - 0.032) < 1e-9
    assert "differs from no clipping by up to 0.032 bpc (LSTM + adam, global_norm 16x)" in \
        report_rules._noise(floor)
    rows[1]["clip_fraction"] = 0.01  # it clipped: no longer the same computation
    assert report_rules.noise_floor(rows) is None and report_rules._noise(None) == ""


def _lm(cell, radius, slope):
    return {"config": {"model": {"cell": cell}}, "jacobian_slope": slope,
            "whh": {"whh_spectral_radius/0": radius}}


def test_trained_model_sentence_only_where_radius_and_slope_disagree():
    """The sentence (an LSTM whose W_hh radius is above 1 yet whose Jacobian grows by less
    than the radius per step) appears only when the numbers say so."""
    note = report_sections._trained_note(_lm("lstm", 1.3, -0.05))
    assert "spectral radius above 1 and yet a slope of -0.05 " in note
    assert f"a factor {math.exp(-0.05):.4f} per step" in note
    assert report_sections._trained_note(_lm("lstm", 0.9, -0.5)) == ""  # radius below 1
    assert report_sections._trained_note(_lm("lstm", 1.3, 0.3)) == ""  # slope ≥ ln 1.3 = 0.262
    assert report_sections._trained_note(_lm("rnn", 1.3, -0.05)) == ""  # no gates to credit
