"""`tsrt report aorta|pulmonary|spine|body`: TotalSegmentator's clinical reports on tsrt's runtime.

Registered in tsrt/cli/root.py as `app.add_typer(report_app, name="report")`. Each command lives in
tsrt/reports/<name>.py; this file only declares the options. Heavy imports happen inside the commands.
"""

from __future__ import annotations

import typer

report_app = typer.Typer(
    help="Clinical reports from the masks (TotalSegmentator's totalseg_*_report commands).",
    no_args_is_help=True,
)
