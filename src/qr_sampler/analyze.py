"""``qr-sampler analyze``: statistics over a provenance-records file.

For every group of records (all of them, and per ``label`` or ``source`` with
``--by``) it reports: tokens, failed tokens, fallback share, mean u, the
Kolmogorov-Smirnov p-value of u against U(0, 1), the Stouffer Z of the
z-scores (sum z / sqrt n) with its two-sided p-value, and the rank
distribution. It recomputes z and u from each record's raw sample mean with
the sampler's own code (:func:`qr_sampler.sampling.amplify.amplify_means`), so
they must agree bit for bit, and checks that every sample mean is an integer
sum over ``byte_count``; mismatches are reported and make the exit status 1.

``--plot out.png`` draws the cumulative deviation: the running sum of z per
group against the token index, with the ±1.96·√n envelope a fair source stays
inside 95% of the time at any given n.

The file is streamed (one ``json.loads`` per line, columns kept as numpy
arrays); a million records take a few seconds. scipy (KS test) and matplotlib
(plot) come with the ``analysis`` extra: ``pip install 'qr-sampler[analysis]'``.
"""

from __future__ import annotations

import argparse
import json
import math
import operator
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from qr_sampler.config import UNIFORM_BYTE_MEAN, UNIFORM_BYTE_STD
from qr_sampler.records import SCHEMA_VERSION
from qr_sampler.sampling.amplify import amplify_means

INSTALL_HINT = "pip install 'qr-sampler[analysis]'"

#: rank buckets of the rank distribution: (label, first rank, last rank)
RANK_BINS: tuple[tuple[str, int, float], ...] = (
    ("0", 0, 0),
    ("1", 1, 1),
    ("2", 2, 2),
    ("3", 3, 3),
    ("4-7", 4, 7),
    ("8-15", 8, 15),
    ("16+", 16, math.inf),
)

_KEYS = (
    "label",
    "entropy_source",
    "fallback",
    "failed",
    "u",
    "z",
    "sample_mean",
    "byte_count",
    "rank",
)
_PARAM_KEYS = ("population_mean", "population_std", "uniform_clamp_epsilon")


class AnalysisError(Exception):
    """The input cannot be analysed (missing file, no records, missing package)."""


@dataclass
class Columns:
    """The records of a file as columns (row i = record i in file order)."""

    label: list[str]
    source: list[str]
    fallback: npt.NDArray[np.bool_]
    failed: npt.NDArray[np.bool_]
    u: npt.NDArray[np.float64]
    z: npt.NDArray[np.float64]
    sample_mean: npt.NDArray[np.float64]
    byte_count: npt.NDArray[np.float64]
    rank: npt.NDArray[np.int64]
    population_mean: npt.NDArray[np.float64]
    population_std: npt.NDArray[np.float64]
    epsilon: npt.NDArray[np.float64]
    malformed_lines: int = 0
    first_malformed_line: int = 0
    other_schema: int = 0
    missing_params: int = 0

    def __len__(self) -> int:
        return len(self.label)


def load_columns(
    path: str | Path,
    *,
    population_mean: float = UNIFORM_BYTE_MEAN,
    population_std: float = UNIFORM_BYTE_STD,
    epsilon: float = 1e-10,
) -> Columns:
    """Stream a JSONL records file into :class:`Columns`.

    Records written without the amplifier parameters get the given defaults.
    Lines that are not JSON objects are counted and skipped.
    """
    get_main = operator.itemgetter(*_KEYS)
    get_params = operator.itemgetter(*_PARAM_KEYS)
    defaults = (population_mean, population_std, epsilon)
    rows: list[tuple[Any, ...]] = []
    params: list[tuple[Any, ...]] = []
    malformed = first_bad = other_schema = missing_params = 0
    loads = json.loads
    append_row = rows.append
    append_params = params.append
    try:
        fh = Path(path).open("rb")  # noqa: SIM115 - closed by the `with` below
    except OSError as exc:
        raise AnalysisError(f"cannot read {path}: {exc.strerror or exc}") from None
    with fh:
        for lineno, line in enumerate(fh, 1):
            try:
                rec = loads(line)
                row = get_main(rec)
            except (ValueError, KeyError, TypeError):
                if not line.strip():
                    continue
                malformed += 1
                first_bad = first_bad or lineno
                continue
            append_row(row)
            try:
                append_params(get_params(rec))
            except KeyError:
                missing_params += 1
                append_params(
                    tuple(rec.get(k, d) for k, d in zip(_PARAM_KEYS, defaults, strict=True))
                )
            if rec.get("schema") != SCHEMA_VERSION:
                other_schema += 1
    if not rows:
        where = f" ({malformed} malformed line(s), first at line {first_bad})" if malformed else ""
        raise AnalysisError(f"{path}: no records found{where}")
    (label, source, fallback, failed, u, z, mean, count, rank) = zip(*rows, strict=True)
    pm, ps, eps = zip(*params, strict=True)
    return Columns(
        label=[str(v) for v in label],
        source=[str(v) for v in source],
        fallback=np.array(fallback, dtype=bool),
        failed=np.array(failed, dtype=bool),
        u=np.array(u, dtype=np.float64),
        z=np.array(z, dtype=np.float64),
        sample_mean=np.array(mean, dtype=np.float64),
        byte_count=np.array(count, dtype=np.float64),
        rank=np.array(rank, dtype=np.int64),
        population_mean=np.array(pm, dtype=np.float64),
        population_std=np.array(ps, dtype=np.float64),
        epsilon=np.array(eps, dtype=np.float64),
        malformed_lines=malformed,
        first_malformed_line=first_bad,
        other_schema=other_schema,
        missing_params=missing_params,
    )


@dataclass
class Integrity:
    """Records whose z, u or sample mean do not recompute exactly."""

    checked: int = 0
    z_mismatches: int = 0
    u_mismatches: int = 0
    mean_mismatches: int = 0
    max_z_error: float = 0.0
    max_u_error: float = 0.0
    first_mismatch_index: int = -1  # 0-based record index

    @property
    def ok(self) -> bool:
        return not (self.z_mismatches or self.u_mismatches or self.mean_mismatches)


def check_integrity(cols: Columns) -> Integrity:
    """Recompute z and u from each sample mean exactly as the sampler does."""
    ok = ~cols.failed & (cols.byte_count > 0)
    idx = np.flatnonzero(ok)
    if idx.size == 0:
        return Integrity()
    mean = cols.sample_mean[idx]
    n = cols.byte_count[idx]
    amp = amplify_means(
        mean, n, cols.population_mean[idx], cols.population_std[idx], cols.epsilon[idx]
    )
    z_bad = ~(amp.z == cols.z[idx])
    u_bad = ~(amp.u == cols.u[idx])
    mean_bad = ~(np.round(mean * n) / n == mean)
    any_bad = z_bad | u_bad | mean_bad
    with np.errstate(invalid="ignore"):
        z_err = np.abs(amp.z - cols.z[idx])
        u_err = np.abs(amp.u - cols.u[idx])
    return Integrity(
        checked=int(idx.size),
        z_mismatches=int(z_bad.sum()),
        u_mismatches=int(u_bad.sum()),
        mean_mismatches=int(mean_bad.sum()),
        max_z_error=float(np.nanmax(z_err)) if np.isfinite(z_err).any() else math.inf,
        max_u_error=float(np.nanmax(u_err)) if np.isfinite(u_err).any() else math.inf,
        first_mismatch_index=int(idx[np.argmax(any_bad)]) if any_bad.any() else -1,
    )


@dataclass
class GroupStats:
    """Statistics of one group of records."""

    name: str
    tokens: int
    failed: int
    fallback: int
    mean_u: float
    ks_statistic: float
    ks_p: float
    stouffer_z: float
    stouffer_p: float
    rank_counts: dict[str, int] = field(default_factory=dict)

    @property
    def fallback_share(self) -> float:
        return self.fallback / self.tokens if self.tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "failed": self.failed,
            "fallback": self.fallback,
            "fallback_share": self.fallback_share,
            "mean_u": _finite_or_none(self.mean_u),
            "ks_statistic": _finite_or_none(self.ks_statistic),
            "ks_p": _finite_or_none(self.ks_p),
            "stouffer_z": _finite_or_none(self.stouffer_z),
            "stouffer_p": _finite_or_none(self.stouffer_p),
            "rank_counts": self.rank_counts,
        }


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def ks_uniform(u: npt.NDArray[np.float64]) -> tuple[float, float]:
    """Kolmogorov-Smirnov test of ``u`` against U(0, 1): (statistic, p-value).

    Needs scipy (the ``analysis`` extra); raises :class:`AnalysisError` without it.
    """
    if u.size == 0:
        return math.nan, math.nan
    try:
        from scipy import stats
    except ImportError:
        raise AnalysisError(f"the KS test needs scipy: {INSTALL_HINT}") from None
    res = stats.kstest(u, "uniform")
    return float(res.statistic), float(res.pvalue)


def group_stats(name: str, cols: Columns, idx: npt.NDArray[np.intp], ks: bool = True) -> GroupStats:
    """Statistics of the records at ``idx``."""
    failed = cols.failed[idx]
    valid = idx[~failed]
    u = cols.u[valid]
    z = cols.z[valid]
    u = u[np.isfinite(u)]
    z = z[np.isfinite(z)]
    ks_stat, ks_p = ks_uniform(u) if ks else (math.nan, math.nan)
    stouffer = float(z.sum() / math.sqrt(z.size)) if z.size else math.nan
    p = math.erfc(abs(stouffer) / math.sqrt(2.0)) if z.size else math.nan
    ranks = cols.rank[valid]
    counts = {
        label: int(np.count_nonzero((ranks >= lo) & (ranks <= hi))) for label, lo, hi in RANK_BINS
    }
    return GroupStats(
        name=name,
        tokens=int(idx.size),
        failed=int(failed.sum()),
        fallback=int(cols.fallback[idx].sum()),
        mean_u=float(u.mean()) if u.size else math.nan,
        ks_statistic=ks_stat,
        ks_p=ks_p,
        stouffer_z=stouffer,
        stouffer_p=p,
        rank_counts=counts,
    )


def group_indices(cols: Columns, by: str | None) -> dict[str, npt.NDArray[np.intp]]:
    """Record indices per group name, largest group first (``by``: label, source)."""
    if by is None:
        return {"all": np.arange(len(cols))}
    keys = cols.label if by == "label" else cols.source
    codes: dict[str, int] = {}
    coded = np.fromiter((codes.setdefault(k, len(codes)) for k in keys), np.intp, len(keys))
    order = np.argsort(coded, kind="stable")
    bounds = np.searchsorted(coded[order], np.arange(len(codes) + 1))
    groups = {name: order[bounds[code] : bounds[code + 1]] for name, code in codes.items()}
    return dict(sorted(groups.items(), key=lambda kv: (-kv[1].size, kv[0])))


@dataclass
class Report:
    path: str
    records: int
    by: str | None
    overall: GroupStats
    groups: list[GroupStats]
    integrity: Integrity
    malformed_lines: int
    first_malformed_line: int
    other_schema: int
    missing_params: int
    notes: list[str] = field(default_factory=list)
    plot: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.path,
            "records": self.records,
            "by": self.by,
            "overall": self.overall.to_dict(),
            "groups": {g.name: g.to_dict() for g in self.groups},
            "integrity": {
                "checked": self.integrity.checked,
                "z_mismatches": self.integrity.z_mismatches,
                "u_mismatches": self.integrity.u_mismatches,
                "mean_mismatches": self.integrity.mean_mismatches,
                "max_z_error": _finite_or_none(self.integrity.max_z_error),
                "max_u_error": _finite_or_none(self.integrity.max_u_error),
                "first_mismatch_record": self.integrity.first_mismatch_index + 1
                if self.integrity.first_mismatch_index >= 0
                else None,
                "ok": self.integrity.ok,
            },
            "malformed_lines": self.malformed_lines,
            "records_other_schema": self.other_schema,
            "records_without_amplifier_params": self.missing_params,
            "notes": self.notes,
            "plot": self.plot,
        }


def analyze(cols: Columns, path: str = "", by: str | None = None) -> Report:
    """All statistics of a loaded file."""
    notes: list[str] = []
    try:
        import scipy  # noqa: F401
    except ImportError:
        ks = False
        notes.append(f"KS p-values not computed: scipy is not installed ({INSTALL_HINT})")
    else:
        ks = True
    everything = np.arange(len(cols))
    overall = group_stats("all", cols, everything, ks)
    groups = (
        [group_stats(name, cols, idx, ks) for name, idx in group_indices(cols, by).items()]
        if by
        else []
    )
    if cols.missing_params:
        notes.append(
            f"{cols.missing_params} record(s) carry no amplifier parameters; "
            "z and u were recomputed with the command-line defaults"
        )
    return Report(
        path=path,
        records=len(cols),
        by=by,
        overall=overall,
        groups=groups,
        integrity=check_integrity(cols),
        malformed_lines=cols.malformed_lines,
        first_malformed_line=cols.first_malformed_line,
        other_schema=cols.other_schema,
        missing_params=cols.missing_params,
        notes=notes,
    )


# -- plot ---------------------------------------------------------------------------

MAX_PLOT_POINTS = 4000
MAX_PLOT_GROUPS = 10


def plot_cumulative(
    cols: Columns,
    groups: dict[str, npt.NDArray[np.intp]],
    out: str | Path,
    size: tuple[int, int] = (1200, 700),
) -> None:
    """Write the cumulative-deviation PNG of ``size`` (width, height) pixels."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise AnalysisError(f"--plot needs matplotlib: {INSTALL_HINT}") from None

    dpi = 100
    # a bare Figure renders with Agg and leaves pyplot's global state alone
    fig = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    ax = fig.subplots()
    longest = 0
    shown = list(groups.items())[:MAX_PLOT_GROUPS]
    for name, idx in shown:
        z = cols.z[idx[~cols.failed[idx]]]
        z = z[np.isfinite(z)]
        if z.size == 0:
            continue
        walk = np.cumsum(z)
        x = np.arange(1, z.size + 1)
        keep = _decimate(z.size)
        ax.plot(x[keep], walk[keep], linewidth=1.0, label=f"{name} (n={z.size:,})")
        longest = max(longest, z.size)
    if longest:
        x = np.linspace(1, longest, MAX_PLOT_POINTS)
        env = 1.96 * np.sqrt(x)
        ax.fill_between(x, -env, env, color="0.85", label="±1.96·√n (95%)", zorder=0)
        ax.plot(x, env, color="0.5", linewidth=0.8)
        ax.plot(x, -env, color="0.5", linewidth=0.8)
    ax.axhline(0.0, color="0.3", linewidth=0.6)
    ax.set_xlabel("token (n)")
    ax.set_ylabel("cumulative sum of z")
    hidden = len(groups) - len(shown)
    title = "Cumulative deviation of z"
    if hidden > 0:
        title += f" ({hidden} smaller group(s) not shown)"
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize="small")
    ax.grid(True, alpha=0.3)
    fig.savefig(str(out), dpi=dpi, format="png")


def _decimate(n: int) -> npt.NDArray[np.intp]:
    if n <= MAX_PLOT_POINTS:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, MAX_PLOT_POINTS).astype(np.intp))


# -- text report -----------------------------------------------------------------


def _fmt(x: float, spec: str) -> str:
    return format(x, spec) if math.isfinite(x) else "n/a"


def format_report(report: Report) -> str:
    """The human-readable report."""
    lines = [
        f"qr-sampler analyze: {report.path}",
        f"records: {report.records:,}"
        + (f", grouped by {report.by}" if report.by else "")
        + (
            f"; {report.malformed_lines} malformed line(s) skipped"
            if report.malformed_lines
            else ""
        ),
        "",
    ]
    rows = [report.overall, *report.groups]
    width = max(10, *(len(g.name) for g in rows))
    head = (
        f"{'group':<{width}}  {'tokens':>10}  {'failed':>7}  {'fallback':>8}  "
        f"{'mean u':>7}  {'KS p':>7}  {'Stouffer Z':>10}  {'p(Z)':>7}"
    )
    lines += [head, "-" * len(head)]
    for g in rows:
        lines.append(
            f"{g.name:<{width}}  {g.tokens:>10,}  {g.failed:>7,}  {g.fallback_share:>8.2%}  "
            f"{_fmt(g.mean_u, '.4f'):>7}  {_fmt(g.ks_p, '.4f'):>7}  "
            f"{_fmt(g.stouffer_z, '+.3f'):>10}  {_fmt(g.stouffer_p, '.4f'):>7}"
        )
    lines += ["", "rank distribution (share of tokens with entropy):"]
    bins = [b[0] for b in RANK_BINS]
    head = f"{'group':<{width}}  " + "  ".join(f"{b:>6}" for b in bins)
    lines += [head, "-" * len(head)]
    for g in rows:
        total = sum(g.rank_counts.values())
        shares = [g.rank_counts[b] / total if total else math.nan for b in bins]
        lines.append(f"{g.name:<{width}}  " + "  ".join(f"{_fmt(s, '.1%'):>6}" for s in shares))
    it = report.integrity
    lines += ["", f"integrity (z and u recomputed from the sample means, {it.checked:,} records):"]
    if it.ok:
        lines.append("  ok: every z, u and sample mean recomputes exactly")
    else:
        lines.append(
            f"  MISMATCH: z {it.z_mismatches:,}, u {it.u_mismatches:,}, "
            f"sample mean not k/N {it.mean_mismatches:,}; "
            f"max |dz| {_fmt(it.max_z_error, '.3g')}, max |du| {_fmt(it.max_u_error, '.3g')}; "
            f"first at record {it.first_mismatch_index + 1}"
        )
    if report.other_schema:
        lines.append(
            f"note: {report.other_schema:,} record(s) have a schema other than {SCHEMA_VERSION}"
        )
    lines += [f"note: {n}" for n in report.notes]
    if report.plot:
        lines.append(f"plot: {report.plot}")
    return "\n".join(lines)


# -- command line ------------------------------------------------------------------


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--plot-size: must be WIDTHxHEIGHT in pixels, e.g. 1200x700; got {text!r}"
        ) from None
    if not (200 <= w <= 10000 and 200 <= h <= 10000):
        raise argparse.ArgumentTypeError(
            f"--plot-size: width and height must be from 200 to 10000 pixels; got {text!r}"
        )
    return w, h


def register(subparsers: Any) -> None:
    """Add the ``analyze`` subcommand."""
    p = subparsers.add_parser(
        "analyze",
        help="statistics and a cumulative-deviation plot from a records file",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("records", help="JSONL provenance-records file (QR_RECORDS_PATH)")
    p.add_argument("--by", choices=("label", "source"), help="also report per label or per source")
    p.add_argument("--plot", metavar="OUT.png", help="write the cumulative-deviation plot here")
    p.add_argument(
        "--plot-size",
        type=_size,
        default=(1200, 700),
        metavar="WxH",
        help="plot size in pixels (default 1200x700)",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument(
        "--population-mean",
        type=float,
        default=UNIFORM_BYTE_MEAN,
        help="null byte mean for records that do not carry it (default 127.5)",
    )
    p.add_argument(
        "--population-std",
        type=float,
        default=UNIFORM_BYTE_STD,
        help="null byte std for records that do not carry it (default: exact uniform)",
    )
    p.add_argument(
        "--epsilon",
        type=float,
        default=1e-10,
        help="u clamp for records that do not carry it (default 1e-10)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Exit status: 0 ok, 1 integrity mismatches, 2 unusable input or missing package."""
    try:
        return _run(args)
    except AnalysisError as exc:
        print(f"qr-sampler analyze: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.plot:  # fail before the long part when matplotlib is missing
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise AnalysisError(f"--plot needs matplotlib: {INSTALL_HINT}") from None
    cols = load_columns(
        args.records,
        population_mean=args.population_mean,
        population_std=args.population_std,
        epsilon=args.epsilon,
    )
    if cols.malformed_lines:
        print(
            f"qr-sampler analyze: warning: skipped {cols.malformed_lines} malformed line(s), "
            f"first at line {cols.first_malformed_line}",
            file=sys.stderr,
        )
    report = analyze(cols, path=str(args.records), by=args.by)
    if args.plot:
        groups = group_indices(cols, args.by) if args.by else {"all": np.arange(len(cols))}
        plot_cumulative(cols, groups, args.plot, args.plot_size)
        report.plot = str(args.plot)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(format_report(report))
    return 0 if report.integrity.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``analyze`` alone (``python -m qr_sampler.analyze``)."""
    parser = argparse.ArgumentParser(prog="qr-sampler")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["analyze", *(sys.argv[1:] if argv is None else argv)])
    status: int = args.func(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
