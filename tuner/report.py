"""Write a tuning run as a Markdown report with a latency-vs-throughput plot and raw JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tuner.engine import Trial, TuneResult

# Beyond this many curves the legend hides the plot; the rest are drawn unlabelled.
MAX_LEGEND = 12


@dataclass(frozen=True)
class ReportPaths:
    """Files written by :func:`write_report`."""

    markdown: Path
    plot: Path
    json: Path

    def to_dict(self) -> dict[str, str]:
        """Return JSON-serialisable values."""
        return {"markdown": str(self.markdown), "plot": str(self.plot), "json": str(self.json)}


@dataclass(frozen=True)
class RunContext:
    """What a tuning run decided and on which data, for the report's header."""

    outcome: str
    reason: str
    source_version: str
    incumbent: dict[str, Any] | None
    data: str
    windows: tuple[dict[str, Any], ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        """Return JSON-serialisable values."""
        return {**asdict(self), "windows": list(self.windows)}


def write_report(
    result: TuneResult,
    out_dir: Path,
    *,
    title: str = "tunewatch tuning report",
    context: RunContext | None = None,
) -> ReportPaths:
    """Write ``report.md``, ``latency_throughput.png`` and ``result.json`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = ReportPaths(
        out_dir / "report.md", out_dir / "latency_throughput.png", out_dir / "result.json"
    )
    plot_curves(result, paths.plot)
    markdown = render_markdown(result, title, paths.plot.name, context=context)
    paths.markdown.write_text(markdown, encoding="utf-8")
    payload = {**result.to_dict(), **({"run": context.to_dict()} if context else {})}
    paths.json.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    return paths


def render_markdown(
    result: TuneResult, title: str, plot_name: str, *, context: RunContext | None = None
) -> str:
    """Return the report's Markdown: outcome, data, incumbent, leaderboard, skipped, plot."""
    winner = result.winner
    lines = [
        f"# {title}",
        "",
        *(_context_lines(context) if context else []),
        f"- Objective: {result.objective} (p95 SLO {result.slo_ms:g} ms); task: {result.task}",
        f"- Search: {result.mode}, {result.measurements} measurements in {result.elapsed_s:.1f} s",
        f"- Winner: {_winner_line(winner)}",
        "",
        "## Leaderboard",
        "",
        "Fidelity is measured against the source's outputs on held-out rows (and labels when "
        "given); the incumbent is the serving champion, measured the same way.",
        "",
        "| # | candidate | passed | items/s | batch | runtime | p50 @1 (ms) | p95 @1 (ms) "
        "| fidelity to source | reason |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row(i, t) for i, t in enumerate(result.leaderboard, 1)]
    if result.skipped:
        lines += ["", "## Skipped", "", "| candidate | reason |", "|---|---|"]
        lines += [f"| {s.name} | {_cell(s.reason)} |" for s in result.skipped]
    lines += ["", "## Latency vs throughput", "", f"![latency vs throughput]({plot_name})", ""]
    return "\n".join(lines)


def _context_lines(c: RunContext) -> list[str]:
    """Return the header lines: outcome and reason, source, data windows, incumbent."""
    lines = [
        f"- Outcome: **{c.outcome}**: {c.reason}",
        f"- Built from and judged against the source version {c.source_version}",
        f"- Data: {c.data}",
    ]
    lines += [f"  - {w.get('label', '')}" for w in c.windows]
    inc = c.incumbent
    if inc:
        fidelity = ", ".join(f"{k} {v:.4f}" for k, v in inc.get("fidelity", {}).items())
        lines.append(
            f"- Incumbent {inc.get('version')}: {'passes' if inc.get('passed') else 'FAILS'} "
            f"the guard on today's data ({fidelity or 'not measured'}); "
            f"{_num(inc.get('throughput'))} items/s at batch {inc.get('batch_size') or '-'}, "
            f"p95 @1 {_num(inc.get('latency_p95_ms'), 3)} ms"
        )
    return lines


def _winner_line(winner: Trial | None) -> str:
    """Describe the winner in one line."""
    if winner is None:
        return "none: no candidate passed the guard within the SLO"
    runtime = winner.config.get("runtime", {})
    return (
        f"**{winner.name}**, {_num(winner.throughput)} items/s at batch "
        f"{winner.best_batch_size}, {runtime.get('threads')} thread(s)"
        f"{', spinning' if runtime.get('spinning') else ''}, artifact `{winner.artifact}`"
    )


def _row(rank: int, t: Trial) -> str:
    """Return one leaderboard row."""
    runtime = t.config.get("runtime", {})
    label = f"t{runtime.get('threads', '?')}" + ("-spin" if runtime.get("spinning") else "")
    accuracy = ", ".join(f"{k} {v:.4f}" for k, v in t.accuracy.items())
    return (
        f"| {rank} | {t.name} | {'yes' if t.passed else 'no'} | {_num(t.throughput)} "
        f"| {t.best_batch_size or '-'} | {label} | {_num(t.latency_p50_ms, 3)} "
        f"| {_num(t.latency_p95_ms, 3)} | {_cell(accuracy)} | {_cell(t.reason)} |"
    )


def _num(value: float | None, digits: int = 1) -> str:
    """Format an optional number."""
    return "-" if value is None else f"{value:.{digits}f}"


def _cell(text: str) -> str:
    """Escape text for a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def plot_curves(result: TuneResult, path: Path) -> Path:
    """Plot p95 latency against throughput for every measured candidate, SLO marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    drawn = 0
    for trial in result.leaderboard:
        if not trial.curve:
            continue
        xs = [p.p95_ms for p in trial.curve]
        ys = [p.throughput for p in trial.curve]
        is_winner = result.winner is not None and trial.name == result.winner.name
        label = trial.name if drawn < MAX_LEGEND or is_winner else None
        style = "-" if trial.passed else ":"
        ax.plot(xs, ys, style, marker="o", lw=3 if is_winner else 1.2, label=label)
        drawn += 1
    ax.axvline(result.slo_ms, color="red", ls="--", lw=1, label=f"SLO {result.slo_ms:g} ms")
    ax.set_xscale("log")
    ax.set_xlabel("p95 latency per batch (ms, log)")
    ax.set_ylabel("throughput (items/s)")
    ax.set_title(f"latency vs throughput ({result.mode} search; dotted = failed guard)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
