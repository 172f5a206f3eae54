#!/usr/bin/env python3
"""Markdown tables from the benchmark suite's JSON results.

One file: the run as a table (the README's and benches/RESULTS.md's form).
Several files (e.g. two commits, or two runs of one): one row per workload,
each run's Kiln figure and ratio side by side, to compare them.

    scripts/bench-table.py target/kiln-bench/latest.json
    scripts/bench-table.py target/kiln-bench/OLD.json target/kiln-bench/NEW.json

Standard library only, so it runs wherever the suite's JSON lands.
"""

import json
import sys


def number(v):
    """A figure to three significant digits, thousands separated."""
    if v is None:
        return ""
    if float(v).is_integer() and abs(v) < 1000:
        return f"{v:.0f}"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def ratio(row):
    if row.get("reference") in (None, 0) or row.get("kiln") is None:
        return None
    # Every unit is higher-is-better except times (as the suite's table has it).
    if row["unit"].startswith(("us", "ms")):
        return row["reference"] / row["kiln"]
    return row["kiln"] / row["reference"]


def header(run):
    return (
        f"commit {run.get('commit', '?')}, {run.get('adapter', '?')} "
        f"({run.get('backend', '?')}), references on {run.get('reference_device', '?')}"
    )


def one_run(run):
    lines = [
        header(run),
        "",
        "| workload | unit | Kiln | reference | ratio | dispatches / step "
        "| submits / step | host µs / step |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in run["rows"]:
        reference = number(row.get("reference"))
        if reference and row.get("reference_name"):
            reference += f" ({row['reference_name']})"
        r = ratio(row)
        lines.append(
            "| {} | {} | {} | {} | {} | {} | {} | {} |".format(
                row["workload"],
                row["unit"],
                number(row.get("kiln")),
                reference,
                f"{r:.2f}" if r is not None else "",
                number(row.get("dispatches_per_step")),
                number(row.get("submits_per_step")),
                number(row.get("host_us_per_step")),
            )
        )
    # Why references or whole workloads are missing, as the suite prints it.
    missing = [row["missing_reference"] for row in run["rows"] if row.get("missing_reference")]
    if missing:
        lines += ["", f"Some references missing: {missing[0]}"]
    for failed in run.get("failed", []):
        lines += ["", f"{failed['workload']} failed: {failed['error']}"]
    return "\n".join(lines)


def side_by_side(runs):
    names = [f"run {i + 1}" for i in range(len(runs))]
    lines = [f"- {n}: {header(r)}" for n, r in zip(names, runs)]
    lines += [
        "",
        "| workload | unit | "
        + " | ".join(f"Kiln, {n} | ratio, {n}" for n in names)
        + " |",
        "|---|---|" + "---:|---:|" * len(runs),
    ]
    order = []
    for run in runs:
        for row in run["rows"]:
            if row["workload"] not in order:
                order.append(row["workload"])
    by_name = [{row["workload"]: row for row in run["rows"]} for run in runs]
    for workload in order:
        cells, unit = [], ""
        for rows in by_name:
            row = rows.get(workload)
            if row is None:
                cells += ["", ""]
                continue
            unit = row["unit"]
            r = ratio(row)
            cells += [number(row.get("kiln")), f"{r:.2f}" if r is not None else ""]
        lines.append(f"| {workload} | {unit} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(paths):
    if not paths:
        sys.exit(__doc__)
    runs = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                runs.append(json.load(f))
        except (OSError, json.JSONDecodeError) as e:
            sys.exit(f"{path}: not a benchmark result ({e})")
    print(one_run(runs[0]) if len(runs) == 1 else side_by_side(runs))


if __name__ == "__main__":
    main(sys.argv[1:])
