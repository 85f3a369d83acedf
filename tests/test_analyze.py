"""`qr-sampler analyze` on records written by the real pipeline and record sink."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from support_tools import DownSource, mock_settings, png_size, run_pipeline

from qr_sampler.analyze import load_columns
from qr_sampler.cli import main as cli_main
from qr_sampler.entropy.fallback import FallbackSource
from qr_sampler.entropy.system import SystemEntropySource
from qr_sampler.records import read_records


@pytest.fixture(scope="module")
def records_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 steps x 2 labels from the mock source (seed 7), then 20 steps from a
    down primary served by the system fallback (label 'c')."""
    path = tmp_path_factory.mktemp("analyze") / "records.jsonl"
    run_pipeline(mock_settings(path, mock_seed=7), steps=300, labels=("a", "b"))
    settings = mock_settings(path)
    fallback = FallbackSource(DownSource(), SystemEntropySource())
    run_pipeline(settings, steps=20, labels=("c",), source=fallback)
    return path


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, object]]:
    status = cli_main(["analyze", *args, "--json"])
    captured = capsys.readouterr()
    sys.stderr.write(captured.err)  # keep warnings readable by the caller
    return status, json.loads(captured.out)


def test_statistics_match_an_independent_computation(
    records_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, report = run_json(capsys, str(records_file), "--by", "label")
    assert status == 0
    recs = read_records(records_file)
    assert report["records"] == len(recs) == 620
    groups = report["groups"]
    assert isinstance(groups, dict)
    assert set(groups) == {"a", "b", "c"}
    for name, g in groups.items():
        mine = [r for r in recs if r["label"] == name]
        z = np.array([r["z"] for r in mine])
        u = np.array([r["u"] for r in mine])
        assert g["tokens"] == len(mine)
        assert g["fallback"] == sum(r["fallback"] for r in mine)
        assert g["stouffer_z"] == pytest.approx(z.sum() / math.sqrt(len(z)), rel=1e-12)
        assert g["mean_u"] == pytest.approx(u.mean(), rel=1e-12)
        assert g["ks_p"] == pytest.approx(stats.kstest(u, "uniform").pvalue, rel=1e-9)
        assert sum(g["rank_counts"].values()) == len(mine)
        assert g["rank_counts"]["0"] == sum(r["rank"] == 0 for r in mine)
    assert groups["c"]["fallback_share"] == 1.0
    assert groups["a"]["fallback_share"] == 0.0
    integrity = report["integrity"]
    assert isinstance(integrity, dict)
    assert integrity["ok"] is True and integrity["checked"] == 620


def test_group_by_source_separates_fallback_bytes(
    records_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, report = run_json(capsys, str(records_file), "--by", "source")
    assert status == 0
    groups = report["groups"]
    assert isinstance(groups, dict)
    assert groups["mock_uniform"]["tokens"] == 600
    assert groups["system"]["tokens"] == 20
    assert groups["system"]["fallback"] == 20


def test_tampered_z_or_u_is_reported_as_mismatch(
    records_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = records_file.read_text().splitlines()
    rec = json.loads(lines[41])
    rec["z"] = math.nextafter(rec["z"], math.inf)  # one ulp: still "exactly" wrong
    lines[41] = json.dumps(rec)
    rec = json.loads(lines[99])
    rec["sample_mean"] = rec["sample_mean"] + 1e-7  # not k / byte_count any more
    lines[99] = json.dumps(rec)
    bad = tmp_path / "tampered.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    status, report = run_json(capsys, str(bad))
    assert status == 1
    integrity = report["integrity"]
    assert isinstance(integrity, dict)
    assert integrity["z_mismatches"] == 2  # line 42's z, line 100's recomputed z
    assert integrity["mean_mismatches"] == 1
    assert integrity["first_mismatch_record"] == 42
    assert integrity["ok"] is False
    status = cli_main(["analyze", str(bad)])
    assert status == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_biased_source_is_detected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Per-byte bias +0.5 shifts each z by 0.5*sqrt(2048)/73.9 = 0.31: over 400
    tokens Stouffer Z is about +6.1 and mean u about Phi(0.31/sqrt 2) = 0.586."""
    path = tmp_path / "biased.jsonl"
    run_pipeline(mock_settings(path, mock_seed=3, mock_bias=0.5), steps=400, labels=("x",))
    status, report = run_json(capsys, str(path))
    assert status == 0
    overall = report["overall"]
    assert isinstance(overall, dict)
    assert overall["stouffer_z"] > 3.0
    assert overall["mean_u"] > 0.54
    assert overall["ks_p"] < 0.01


def test_plot_is_a_png_of_the_requested_size(
    records_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "walk.png"
    status = cli_main(
        [
            "analyze",
            str(records_file),
            "--by",
            "label",
            "--plot",
            str(out),
            "--plot-size",
            "900x500",
        ]
    )
    assert status == 0
    assert png_size(out) == (900, 500)
    assert f"plot: {out}" in capsys.readouterr().out
    default = tmp_path / "default.png"
    assert cli_main(["analyze", str(records_file), "--plot", str(default)]) == 0
    assert png_size(default) == (1200, 700)


def test_failed_tokens_and_malformed_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "mixed.jsonl"
    settings = mock_settings(path, fallback_mode="error")
    run_pipeline(settings, steps=3, labels=("ok",))
    run_pipeline(settings, steps=2, labels=("dead",), source=FallbackSource(DownSource(), None))
    with path.open("a") as fh:
        fh.write('{"truncated": \n')
    recs = [json.loads(x) for x in path.read_text().splitlines()[:5]]
    assert recs[3]["failed"] is True and recs[3]["u"] is None  # null, not NaN
    status, report = run_json(capsys, str(path), "--by", "label")
    assert status == 0
    assert report["malformed_lines"] == 1
    groups = report["groups"]
    assert isinstance(groups, dict)
    assert groups["dead"]["failed"] == 2 and groups["dead"]["mean_u"] is None
    assert groups["ok"]["failed"] == 0
    assert "skipped 1 malformed line(s), first at line 6" in capsys.readouterr().err


def test_unusable_input_fails_with_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["analyze", str(tmp_path / "missing.jsonl")]) == 2
    assert "cannot read" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert cli_main(["analyze", str(empty)]) == 2
    assert "no records found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["analyze", str(empty), "--by", "colour"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["analyze", str(empty), "--plot-size", "big"])
    assert "--plot-size: must be WIDTHxHEIGHT" in capsys.readouterr().err


def test_missing_matplotlib_is_named(
    records_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """matplotlib made unimportable (sys.modules entry None) to stand for an
    install without the analysis extra."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert cli_main(["analyze", str(records_file), "--plot", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "needs matplotlib" in err and "qr-sampler[analysis]" in err
    assert not (tmp_path / "x.png").exists()


def test_old_records_without_amplifier_parameters_use_defaults(
    records_file: Path, tmp_path: Path
) -> None:
    old = tmp_path / "old.jsonl"
    keep = ("population_mean", "population_std", "uniform_clamp_epsilon")
    with old.open("w") as fh:
        for line in records_file.read_text().splitlines()[:50]:
            rec = {k: v for k, v in json.loads(line).items() if k not in keep}
            fh.write(json.dumps(rec) + "\n")
    cols = load_columns(old)
    assert cols.missing_params == 50
    from qr_sampler.analyze import analyze

    report = analyze(cols)
    assert report.integrity.ok and report.integrity.checked == 50
    cols = load_columns(old, population_mean=127.0)  # wrong null -> every z disagrees
    assert analyze(cols).integrity.z_mismatches == 50
