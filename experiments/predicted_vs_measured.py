"""The roofline's predicted decode latency against the measured one, per schedule and per group.

Reads finished runs of the main job (their metrics.json and plan.json; `stagejax.roofline_report`
says what every number means) and writes into --out: predicted_vs_measured.md (tables and error
statistics), schedules.csv, kinds.csv, groups.csv, predicted_vs_measured.json, roofline.png and
predicted_vs_measured.png. The chart's roofline is the device of --device (default this_machine:
the cached calibration; it is measured, ~10 s, only if no calibration is cached).

    python experiments/predicted_vs_measured.py experiments/results/schedules_smollm2/*/round1/
    python experiments/predicted_vs_measured.py experiments/results/budget_smollm2 --out /tmp/pvm

A directory without metrics.json that holds runs below it (a sweep) stands for those runs; runs
written before predictions were recorded are skipped with a message.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "experiments" / "results" / "predicted_vs_measured"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", help="run directories (or sweeps holding runs)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"output directory ({DEFAULT_OUT})")
    parser.add_argument("--device", default="this_machine",
                        help="device profile for the chart's roofline (conf/device/<name>.yaml)")
    args = parser.parse_args(argv)

    from stagejax import roofline_report as rr
    from stagejax.devices import load_device

    try:
        runs = rr.collect_runs(args.run_dirs)
        if not runs:
            raise ValueError("none of the given runs has predictions (all were skipped above)")
        report = rr.build_report(runs, load_device(args.device))
    except (FileNotFoundError, ValueError) as error:  # bad run dirs, plan rows or device profile
        print(f"error: {error}", file=sys.stderr)
        return 2
    paths = rr.write_report(report, args.out)
    print(rr.markdown_table(rr.schedule_table(report)))
    print()
    print("error statistics (|predicted / measured - 1|):")
    print("\n".join(rr.error_lines(report)))
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
