"""The A/B report over the request log: join, statistics, SRM, reading, CLI."""

from __future__ import annotations

import gzip
import json
import math
import sys

import numpy as np
import pytest

from daemon.tools import report
from daemon.tools.report import Group, build, chi2_sf, main, srm_check, z_quantile


def answer(rid, arm, lane="stable", status=0, latency_us=1000, exp="e1", model="m", version="1"):
    return {"ts": 1.7e9 + rid * 1e-3, "type": "answer", "rid": rid, "key": "9f86d081", "exp": exp,
            "arm": arm, "lane": lane, "model": model, "version": version, "status": status,
            "latency_us": latency_us, "queue_us": 10, "compute_us": 500, "batch": 8,
            "score": 0.5, "features": "c0ffee"}


def feedback(rid, outcome, arm=None, joined=True):
    return {"ts": 1.7e9 + rid * 1e-3 + 1, "type": "feedback", "rid": rid, "outcome": outcome,
            "joined": joined, "model": "m", "version": "1", "lane": "stable", "arm": arm}


def write(path, records, tail: str = "") -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.write(tail)


def ab_log(n=20_000, treatment_share=0.5, base=0.10, effect=0.03, feedback_share=0.9, seed=7):
    """Answers of a two-arm experiment (and a 10 % canary lane with no
    effect), and 0/1 outcomes for ``feedback_share`` of the OK ones: the
    treatment converts ``effect`` more. Returns the records and, per arm, the
    outcomes as written (the truth the report must reproduce)."""
    rng = np.random.default_rng(seed)
    arms = np.where(rng.random(n) < treatment_share, "treatment", "control")
    lanes = np.where(rng.random(n) < 0.1, "canary", "stable")
    status = np.where(rng.random(n) < 0.01, 14, 0)
    latency = rng.lognormal(7, 0.5, n).astype(int)
    has_fb = (rng.random(n) < feedback_share) & (status == 0)
    y = (rng.random(n) < np.where(arms == "treatment", base + effect, base)).astype(float)
    answers = [answer(i, str(arms[i]), str(lanes[i]), int(status[i]), int(latency[i]))
               for i in range(n)]
    fbs = [feedback(int(i), float(y[i]), str(arms[i])) for i in np.flatnonzero(has_fb)]
    truth = {a: y[has_fb & (arms == a)] for a in ("control", "treatment")}
    return answers, fbs, truth


@pytest.fixture(scope="module")
def ab(tmp_path_factory):
    """One 20k-answer log, rotated over three files, with feedback that
    lands in a later file than its answer."""
    d = tmp_path_factory.mktemp("ablog")
    answers, fbs, truth = ab_log()
    write(d / "requests-0001.jsonl", answers[:12_000])
    write(d / "requests-0002.jsonl", answers[12_000:] + fbs[:5_000])
    write(d / "requests-0003.jsonl", fbs[5_000:])
    return d, truth, run(d)


def run(d, **kw):
    return report.report(build(report.log_files(d)), **kw)


def arms_of(doc, exp="e1"):
    (e,) = [e for e in doc["experiments"] if e["exp"] == exp]
    return e, {r["name"]: r for r in e["arms"]}


# -- the known effect -------------------------------------------------------------


def test_known_effect_is_found_with_the_right_sign_and_covered(ab):
    d, truth, doc = ab
    e, arms = arms_of(doc)
    assert e["control"] == "control"
    for name, y in truth.items():   # the join reproduces the outcomes exactly
        assert arms[name]["kpi"]["joined"] == len(y)
        assert arms[name]["kpi"]["mean"] == pytest.approx(y.mean(), abs=1e-12)
    vs = arms["treatment"]["vs_control"]
    assert vs["diff"] > 0 and vs["p_value"] < 1e-6
    assert vs["ci"][0] < 0.03 < vs["ci"][1]
    assert vs["diff"] == pytest.approx(truth["treatment"].mean() - truth["control"].mean(),
                                       abs=1e-12)
    se = math.sqrt(truth["treatment"].var(ddof=1) / len(truth["treatment"])
                   + truth["control"].var(ddof=1) / len(truth["control"]))
    assert vs["stderr"] == pytest.approx(se, rel=1e-9)
    assert arms["control"]["vs_control"] is None
    assert doc["join"]["joined"] == sum(len(y) for y in truth.values())
    assert doc["join"]["feedback_unmatched"] == 0


def test_lanes_without_effect_have_an_interval_covering_zero(ab):
    (m,) = ab[2]["models"]
    lanes = {r["name"]: r for r in m["lanes"]}
    assert m["control"] == "stable" and set(lanes) == {"stable", "canary"}
    lo, hi = lanes["canary"]["vs_control"]["ci"]
    assert lo < 0 < hi
    assert lanes["stable"]["answers"] + lanes["canary"]["answers"] == 20_000


def test_error_rate_and_latency_percentiles(ab):
    _, arms = arms_of(ab[2])
    c = arms["control"]
    assert c["error_rate"] == pytest.approx(c["status"]["UNAVAILABLE"] / c["answers"])
    assert 0.005 < c["error_rate"] < 0.02
    # lognormal(7, 0.5): p50 = e^7 = 1097 us; the histogram's bins are 4.7 % wide
    assert c["latency_us"]["p50"] == pytest.approx(math.exp(7), rel=0.08)
    assert c["latency_us"]["p50"] < c["latency_us"]["p95"] < c["latency_us"]["p99"]


def test_fallback_answers_are_failures_of_their_lane_and_their_feedback_is_left_out(tmp_path):
    """The daemon logs a fallback's answer with status 0 and ``fallback``,
    and its feedback unjoined: the report counts it as its lane's failure
    and out of the latency and the KPI."""
    fell = dict(answer(3, "a", lane="canary", latency_us=10), fallback="no_worker", routed="2",
                version="small")
    write(tmp_path / "requests-0001.jsonl", [
        answer(1, "a", lane="canary", latency_us=1000), answer(2, "a", lane="canary", status=13),
        fell, feedback(1, 1.0), feedback(3, 0.0, joined=False)])
    doc = run(tmp_path)
    (m,) = doc["models"]
    canary = next(r for r in m["lanes"] if r["name"] == "canary")
    assert canary["status"] == {"OK": 1, "INTERNAL": 1, "FALLBACK": 1}
    assert canary["error_rate"] == pytest.approx(2 / 3)
    assert canary["latency_us"]["p50"] == pytest.approx(1000, rel=0.05)
    assert canary["kpi"]["joined"] == 1 and canary["kpi"]["mean"] == 1.0


# -- sample-ratio mismatch --------------------------------------------------------


def test_planted_sample_ratio_mismatch_is_flagged_and_an_honest_split_is_not(tmp_path):
    for share, flagged in ((0.6, True), (0.5, False)):
        d = tmp_path / f"s{share}"
        d.mkdir()
        answers, fbs, _ = ab_log(n=5_000, treatment_share=share, seed=11)
        write(d / "r.jsonl", answers + fbs)
        e, _ = arms_of(run(d))
        assert e["srm"]["mismatch"] is flagged, e["srm"]
    # The 60/40 is honest when 60/40 is what was configured.
    e, _ = arms_of(run(tmp_path / "s0.6", split={"control": 0.4, "treatment": 0.6}))
    assert e["srm"]["mismatch"] is False


def test_srm_check_names_arms_missing_from_the_split_and_counts_absent_ones():
    assert srm_check({"a": 10, "b": 10, "c": 5}, {"a": 1, "b": 1})["mismatch"] is None
    s = srm_check({"a": 1000}, {"a": 0.5, "b": 0.5})
    assert s["observed"] == {"a": 1000, "b": 0} and s["mismatch"] is True


# -- statistics ----------------------------------------------------------------------


def test_chi2_tail_matches_closed_forms():
    for x in (0.01, 0.5, 1, 3.841458820694124, 10, 40, 200):
        assert chi2_sf(x, 1) == pytest.approx(math.erfc(math.sqrt(x / 2)), rel=1e-10, abs=1e-300)
        assert chi2_sf(x, 2) == pytest.approx(math.exp(-x / 2), rel=1e-10, abs=1e-300)
        # df = 6: e^{-x/2} (1 + x/2 + (x/2)^2 / 2)
        h = x / 2
        assert chi2_sf(x, 6) == pytest.approx(math.exp(-h) * (1 + h + h * h / 2),
                                              rel=1e-10, abs=1e-300)
    assert chi2_sf(3.841458820694124, 1) == pytest.approx(0.05, rel=1e-9)
    assert chi2_sf(0, 3) == 1.0
    assert z_quantile(0.05) == pytest.approx(1.959963984540054, rel=1e-12)


def test_groups_merge_like_one():
    rng = np.random.default_rng(0)
    parts = [rng.normal(i, 1 + i, 50 + 10 * i) for i in range(4)]
    gs = []
    for y in parts:
        g = Group()
        g.kpi_n, g.kpi_mean, g.kpi_m2 = len(y), y.mean(), ((y - y.mean()) ** 2).sum()
        gs.append(g)
    total = Group()
    for g in gs:
        total.merge(g)
    allv = np.concatenate(parts)
    assert total.kpi_n == len(allv)
    assert total.kpi_mean == pytest.approx(allv.mean(), rel=1e-12)
    assert total.kpi_var() == pytest.approx(allv.var(ddof=1), rel=1e-12)


# -- reading and joining ------------------------------------------------------------


def test_torn_last_lines_are_skipped_and_bad_lines_counted(tmp_path):
    write(tmp_path / "a.jsonl", [answer(1, "x"), answer(2, "y")], tail='{"ts": 1.0, "type": "answ')
    write(tmp_path / "b.jsonl", [answer(3, "x"), feedback(1, 1.0), feedback(2, 0.0)],
          tail='{"ts": 2.0, "type": "feedback", "ri')
    with open(tmp_path / "c.jsonl", "w") as f:
        f.write("not json\n" + json.dumps(answer(4, "y")) + "\n"
                + json.dumps({"type": "answer"}) + "\n")
    raw = build(report.log_files(tmp_path))
    assert raw["tally"]["torn_lines"] == 2
    assert raw["tally"]["bad_lines"] == 1 and raw["tally"]["bad_records"] == 1
    assert raw["tally"]["answers"] == 5 and raw["join"]["answers"] == 4
    assert raw["join"]["joined"] == 2


def test_join_is_order_free_sums_repeat_feedback_and_counts_the_unmatched(tmp_path):
    # Feedback in an earlier file than its answer; rid 1 gets two outcomes;
    # rid 99 has no answer; rid 3's feedback was not joined online.
    write(tmp_path / "0.jsonl", [feedback(1, 2.0), feedback(99, 1.0),
                                 feedback(3, 5.0, joined=False),
                                 {"ts": 1.0, "type": "feedback", "rid": None, "outcome": 1.0,
                                  "joined": False, "model": None, "version": None, "lane": None,
                                  "arm": None}])
    write(tmp_path / "1.jsonl", [answer(1, "a"), answer(2, "a"), answer(3, "b"), answer(4, "b"),
                                 feedback(1, 3.0), feedback(2, 1.0), feedback(4, 0.0)])
    raw = build(report.log_files(tmp_path))
    j = raw["join"]
    assert (j["joined"], j["feedback_matched"], j["feedback_unmatched"],
            j["feedback_unjoined"]) == (3, 4, 1, 2)
    assert j["answers_with_repeat_feedback"] == 1
    _, arms = arms_of(report.report(raw))
    assert arms["a"]["kpi"]["mean"] == 3.0          # rid 1: 2 + 3, rid 2: 1
    assert arms["b"]["kpi"]["joined"] == 1 and arms["b"]["kpi"]["mean"] == 0.0


def test_filters_rotated_gzip_files_and_duplicate_rids(tmp_path):
    write(tmp_path / "r.jsonl", [answer(1, "a", exp="e1"), answer(2, "b", exp="e2", model="other"),
                                 answer(3, "a", exp=None)])
    with gzip.open(tmp_path / "r.jsonl.1.gz", "wt") as f:
        f.write(json.dumps(answer(1, "a", exp="e1")) + "\n")
    raw = build(report.log_files(tmp_path), exp="e1")
    assert raw["join"]["answers"] == 2 and raw["join"]["duplicate_rids"] == 1
    assert raw["tally"]["filtered_out"] == 2
    raw = build(report.log_files(tmp_path), model="m")
    doc = report.report(raw)
    assert [e["exp"] for e in doc["experiments"]] == ["e1"]    # exp None is in no experiment
    assert doc["models"][0]["lanes"][0]["answers"] == 3


# -- output and command line -----------------------------------------------------------


def test_json_output_shape(ab, tmp_path, capsys):
    d = ab[0]
    out = tmp_path / "r.json"
    assert main(["--log", str(d), "--exp", "e1", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "experiment e1 (control: control)" in table and "treatment" in table
    doc = json.loads(out.read_text())
    assert set(doc) >= {"alpha", "confidence", "records", "join", "span", "experiments", "models",
                        "log", "files", "filters"}
    assert doc["files"] == ["requests-0001.jsonl", "requests-0002.jsonl", "requests-0003.jsonl"]
    assert doc["filters"] == {"exp": "e1", "model": None}
    (e,) = doc["experiments"]
    assert set(e) == {"exp", "control", "arms", "srm"}
    assert set(e["srm"]) >= {"observed", "expected", "chi2", "df", "p_value", "mismatch", "alpha"}
    row = e["arms"][1]
    assert set(row) == {"name", "answers", "error_rate", "non_ok_rate", "status", "latency_us",
                        "versions", "kpi", "vs_control"}
    assert set(row["latency_us"]) == {"p50", "p95", "p99"}
    assert set(row["kpi"]) == {"joined", "joined_share", "mean", "stderr", "ci"}
    assert set(row["vs_control"]) == {"diff", "stderr", "ci", "p_value", "relative"}
    assert main(["--log", str(d), "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["join"]["answers"] == 20_000


def test_cli_control_alpha_and_plot(ab, tmp_path, capsys):
    d = ab[0]
    out = tmp_path / "r.json"
    assert main(["--log", str(d), "--control", "treatment", "--alpha", "0.01", "--json", str(out),
                 "--plot", str(tmp_path / "r.png")]) == 0
    doc = json.loads(out.read_text())
    e, arms = arms_of(doc)
    assert e["control"] == "treatment" and arms["control"]["vs_control"]["diff"] < 0
    assert doc["confidence"] == 0.99
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_exit_codes(ab, tmp_path, capsys, monkeypatch):
    d = ab[0]
    assert main(["--log", str(tmp_path / "nope")]) == 2
    assert "no such log directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["--log", str(tmp_path / "empty")]) == 2
    assert "no log files" in capsys.readouterr().err
    assert main(["--log", str(d), "--exp", "nope"]) == 1
    assert "no answers with --exp nope" in capsys.readouterr().err
    assert main(["--log", str(d), "--control", "nope"]) == 2
    assert "has no arm 'nope'" in capsys.readouterr().err
    for bad in (["--alpha", "1.5"], ["--split", "a=0"], ["--split", "a"], []):
        assert main(["--log", str(d), *bad] if bad else bad) == 2
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["--log", str(d), "--plot", str(tmp_path / "x.png")]) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
