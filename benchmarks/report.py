"""The benchmark's report: the machine it ran on, the targets, and the JSON, Markdown table and PNG plot.

    python benchmarks/report.py benchmarks/reported/full.json --out /tmp/report   # re-render .md and .png

backends.py writes NAME.json (everything measured), NAME.md (the tables) and NAME.png (wall time by
stage with peak memory) after every workload, so an interrupted run keeps what it measured. Run alone,
this script re-renders the Markdown and the plot from a results JSON (after a change to the tables or
the targets, without measuring again); the JSON itself is left as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from memory import nvidia_smi
from speed import STAGES

Report = dict[str, Any]


def machine() -> dict[str, Any]:
    """CPU, cores, memory, runtimes and the CPU features reduced precision depends on (bf16, AMX, VNNI)."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
               platform.processor())
    flags = next((line for line in cpuinfo if line.startswith("flags")), "")
    import onnxruntime

    info = {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(os.sysconf("SC_PHYS_PAGES") *
            os.sysconf("SC_PAGE_SIZE") / 2**30), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "load_average_at_start": os.getloadavg(),
            "avx512_bf16": "avx512_bf16" in flags, "amx": "amx_bf16" in flags, "avx512_vnni": "avx512_vnni" in flags}
    try:
        import openvino

        info["openvino"] = openvino.__version__.split("-")[0]
    except ModuleNotFoundError:
        pass
    gpu = nvidia_smi("name")
    if gpu:
        info["gpu"] = gpu
    return info


def targets(report: Report) -> list[dict[str, Any]]:
    """The issue's CPU targets for tsrt (fp32, ONNX Runtime cpu) against official TotalSegmentator."""
    found = []
    rows = report["workloads"]

    def pair(workload: str) -> tuple[dict, dict] | None:
        if workload not in rows or "tsrt cpu" not in rows[workload] or "TotalSegmentator (PyTorch)" not in rows[workload]:
            return None
        return rows[workload]["TotalSegmentator (PyTorch)"], rows[workload]["tsrt cpu"]

    if (fast := pair("ct_fast")) is not None:
        speedup = fast[0]["wall_s"] / fast[1]["wall_s"]
        found.append({"target": "--fast on example_ct >= 5x faster", "measured": f"{speedup:.2f}x",
                      "reached": speedup >= 5})
        found.append({"target": "--fast on example_ct <= 1 GB peak RSS",
                      "measured": f"{fast[1]['peak_rss_mb']:.0f} MB", "reached": fast[1]["peak_rss_mb"] <= 1024})
    if (total := pair("ct_total")) is not None:
        speedup = total[0]["wall_s"] / total[1]["wall_s"]
        found.append({"target": "total on example_ct >= 2.3x faster (fp32)", "measured": f"{speedup:.2f}x",
                      "reached": speedup >= 2.3})
    shares = {name: workload["tsrt cpu"]["non_inference_share"] for name, workload in rows.items()
              if "tsrt cpu" in workload and workload["tsrt cpu"].get("non_inference_share") is not None}
    if shares:
        worst = max(shares, key=shares.get)
        found.append({"target": "non-inference overhead <= 10 % of tsrt's wall time",
                      "measured": ", ".join(f"{k} {v * 100:.0f} %" for k, v in shares.items()),
                      "reached": shares[worst] <= 0.10})
    if "phantom_fast" in rows and "tsrt cpu" in rows["phantom_fast"]:
        peak = rows["phantom_fast"]["tsrt cpu"]["peak_rss_mb"]
        found.append({"target": "512x512x800 phantom --fast < 2 GB peak RSS", "measured": f"{peak:.0f} MB",
                      "reached": peak < 2048})
    return found


def markdown(report: Report) -> str:
    lines = [f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, "
             f"{report['machine']['memory_gb']} GB; load average at start "
             f"{', '.join(f'{x:.1f}' for x in report['machine']['load_average_at_start'])}; "
             f"{report['runs']} timed run(s) after {report['warmup']} warm-up round(s), medians"
             + "".join(f"; {name}: {n} run, no warm-up" for name, n in report.get("runs_capped", {}).items())
             + ".", "",
             f"Command: `{report['command']}`"
             + (f" (resuming the run of {report['resumed_from']})" if report.get("resumed_from") else ""), ""]
    header = ("| workload | backend | wall s | × vs reference | load models | read | preprocess | inference | postprocess "
              "| write | startup | tiles/s | peak RSS MB | outside network | agreement | Dice |")
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for name, rows in report["workloads"].items():
        accuracy = report["accuracy_random_weights"].get(name, {})
        references = {row["group"]: row["wall_s"] for row in rows.values() if row["backend"] in ("official", "nnunet")}
        for label, row in rows.items():
            reference = references.get(row["group"])
            ratio = f"{reference / row['wall_s']:.2f}×" if reference and row["wall_s"] else "–"
            stages = row["stages_s"]
            acc = accuracy.get(label, {})
            gpu = f" (GPU {row['gpu_peak_mb']:.0f})" if row.get("gpu_peak_mb") else ""
            cells = [name, label, f"{row['wall_s']:.1f}", "ref" if label in
                     ("TotalSegmentator (PyTorch)", "nnUNetPredictor (PyTorch)") else ratio]
            cells += [f"{stages[s]:.1f}" if stages.get(s) else "–" for s in
                      ("load models", "read", "preprocess", "inference", "postprocess", "write", "startup")]
            cells += [f"{row['tiles_per_s']:.2f}" if row.get("tiles_per_s") else "–",
                      f"{row['peak_rss_mb']:.0f}{gpu}",
                      f"{row['non_inference_share'] * 100:.0f} %" if row.get("non_inference_share") is not None else "–",
                      f"{acc['agreement'] * 100:.2f} %" if acc.get("agreement") is not None else "–",
                      f"{acc['dice']:.4f}" if acc.get("dice") is not None else "–"]
            lines.append("| " + " | ".join(cells) + " |")
    floor = report["random_weights_floor"]
    lines += ["", f"Random weights: float noise alone caps agreement at about {floor * 100:.1f} % "
              "(near-tied logits); the confident-weights table below is the accuracy check.",
              "Official TotalSegmentator's `preprocess` includes nnU-Net's own pipeline around the network "
              "(worker start-up, preprocessing, export in worker processes); `startup` is process start and imports.",
              ""]
    if report.get("failures"):
        lines += ["Failed runs (left out above):", ""] + [f"- {k}: {v}" for k, v in report["failures"].items()] + [""]
    if report.get("targets"):
        lines += ["| target (tsrt cpu, fp32) | measured | reached |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['reached'] else 'no'} |" for t in report["targets"]]
        lines.append("")
    if report.get("accuracy_confident"):
        lines += ["Confident weights (trained demo backbone, 128³ patches), Dice vs official TotalSegmentator:", "",
                  "| workload | backend | agreement | mean Dice | classes |", "|---|---|---|---|---|"]
        for name, rows in report["accuracy_confident"].items():
            for label, acc in rows.items():
                lines.append(f"| {name} | {label} | {acc['agreement'] * 100:.3f} % | {acc['dice']:.4f} | "
                             f"{acc.get('classes', '–')} |")
        lines.append("")
    if report.get("demo_precision"):
        lines += ["Trained demo model on an unseen phantom (reduced precision vs fp32 ONNX Runtime; "
                  "Dice = mean over the phantom's 8 organs, the demo model has learned only some of them):", "",
                  "| provider | inference s | speed-up vs cpu | Dice vs fp32 | Dice vs truth |", "|---|---|---|---|---|"]
        for provider, row in report["demo_precision"].items():
            lines.append(f"| {provider} | {row['inference_s']:.2f} | {row['speedup_vs_cpu']:.2f}× | "
                         f"{row['dice_vs_fp32']:.4f} | {row['dice_vs_truth']:.4f} |")
        lines.append("")
    if report.get("cold_start"):
        lines += ["| cold start | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in report["cold_start"].items()] + [""]
    if report.get("installed_mb"):
        lines += ["| installed size | MB |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in report["installed_mb"].items()] + [""]
    return "\n".join(lines)


def plot(report: Report, target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = {name: rows for name, rows in report["workloads"].items() if rows}
    if not workloads:
        return
    fig, axes = plt.subplots(len(workloads), 1, figsize=(10, 1.0 + 0.55 * sum(len(r) for r in workloads.values())
                                                         + 0.6 * len(workloads)), squeeze=False)
    colours = dict(zip(STAGES, ("#bbbbbb", "#8c564b", "#9467bd", "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e")))
    for ax, (name, rows) in zip(axes[:, 0], workloads.items()):
        labels = list(rows)
        left = [0.0] * len(labels)
        for stage in STAGES:
            widths = [rows[label]["stages_s"].get(stage) or 0.0 for label in labels]
            ax.barh(labels, widths, left=left, color=colours[stage], label=stage)
            left = [a + b for a, b in zip(left, widths)]
        for index, label in enumerate(labels):
            row = rows[label]
            ax.text(left[index], index, f" {row['wall_s']:.1f} s, {row['peak_rss_mb'] / 1024:.2f} GB", va="center",
                    fontsize=8)
        ax.invert_yaxis()
        ax.set_title(name, fontsize=10, loc="left")
        ax.set_xlim(0, max(left) * 1.35)
    axes[-1, 0].set_xlabel("wall time per run (s), by stage; peak RSS at the bar's end")
    handles, names = axes[0, 0].get_legend_handles_labels()
    height = fig.get_size_inches()[1]
    fig.legend(handles, names, ncol=len(STAGES), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 1 - 0.45 / height))
    fig.suptitle(f"tsrt vs PyTorch backends - {report['machine']['cpu']}, {report['machine']['cores']} cores",
                 fontsize=10, y=1 - 0.05 / height)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.8 / height))
    fig.savefig(target, dpi=110)
    plt.close(fig)



def render(report: Report, out: Path, stem: str) -> None:
    """Write OUT/STEM.md and OUT/STEM.png from a report (its targets already computed)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(markdown(report) + "\n")
    plot(report, out / f"{stem}.png")


def save(report: Report, out: Path, stem: str, started: float | None = None) -> None:
    """Write (or rewrite) the JSON, Markdown and PNG files with what has been measured so far."""
    report["targets"] = targets(report)
    if started is not None:
        report["seconds"] = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    render(report, out, stem)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="a results JSON written by backends.py")
    parser.add_argument("--out", type=Path, help="folder for NAME.md and NAME.png (default: the JSON's folder)")
    parser.add_argument("--name", help="output file stem (default: the JSON's)")
    args = parser.parse_args(argv)

    report = json.loads(args.results.read_text())
    report["targets"] = targets(report)
    out, stem = args.out or args.results.parent, args.name or args.results.stem
    render(report, out, stem)
    print(markdown(report))
    print(f"wrote {out / stem}.md/.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
