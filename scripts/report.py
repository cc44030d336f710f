#!/usr/bin/env python
"""Turn a sweep or results directory into report.md, report.csv, pareto.png, timeline.png and
trace.json: the same as `python -m stagejax.report <dir>` (see stagejax/report.py).

    scripts/report.py multirun/2026-11-21/10-00-00.000000
    scripts/report.py experiments/results/schedules_smollm2 --out /tmp/report
"""

from stagejax.report import main

if __name__ == "__main__":
    main()
