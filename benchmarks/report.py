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
from workloads import REPORTED_CPU_FLAGS, cpu_flags

Report = dict[str, Any]
#: Precisions below fp32: on random weights their agreement and Dice measure rounding on near-ties, not accuracy.
REDUCED_PRECISIONS = ("fp16", "bf16", "int8")
#: The CPU flags the Markdown header names (all of REPORTED_CPU_FLAGS are in the JSON).
HEADER_FLAGS = ("avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def machine() -> dict[str, Any]:
    """CPU, cores, memory, runtimes and the CPU features reduced precision depends on (VNNI, bf16, AMX)."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
               platform.processor())
    flags = cpu_flags()
    import onnxruntime

    info = {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(os.sysconf("SC_PHYS_PAGES") *
            os.sysconf("SC_PAGE_SIZE") / 2**30), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "load_average_at_start": os.getloadavg(),
            "cpu_flags": {flag: flag in flags for flag in REPORTED_CPU_FLAGS},
            # the three the earlier reports had, kept for readers of those
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


def row_columns(row: dict[str, Any]) -> tuple[str, str, str]:
    """(backend, engine, precision) of a measured row; rows of earlier reports (provider "openvino-bf16", no
    precision) are read as tsrt reads that spelling today."""
    from tsrt.engines.providers import DEPRECATED_PROVIDERS

    if row["backend"] in ("official", "nnunet"):
        return {"official": "TotalSegmentator", "nnunet": "nnUNetPredictor"}[row["backend"]], "PyTorch", "fp32"
    provider, precision = DEPRECATED_PROVIDERS.get(row["provider"], (row["provider"], row.get("precision", "fp32")))
    engine = f"{provider} --low-memory" if row.get("low_memory") else provider
    return {"tsrt": "tsrt", "tsrt-model": "tsrt --model"}[row["backend"]], engine, precision


def legacy_row(label: str) -> dict[str, Any]:
    """The row fields of a label from reports before rows carried them ("tsrt cpu", "tsrt openvino-bf16 --model")."""
    words = label.split()
    return {"backend": "tsrt-model" if "--model" in words else "tsrt", "provider": words[1]}


def find_row(rows: dict[str, dict[str, Any]], backend: str, engine: str = "PyTorch",
             precision: str = "fp32") -> dict[str, Any] | None:
    """The row of a workload with this backend ("official", "tsrt", ...), engine and precision."""
    for row in rows.values():
        name, row_engine, row_precision = row_columns(row)
        if row["backend"] == backend and (row_engine, row_precision) == (engine, precision):
            return row
    return None


def targets(report: Report) -> list[dict[str, Any]]:
    """The issue's CPU targets for tsrt (fp32, ONNX Runtime cpu) against official TotalSegmentator."""
    found = []
    rows = report["workloads"]

    def pair(workload: str) -> tuple[dict, dict] | None:
        official = find_row(rows.get(workload, {}), "official")
        tsrt = find_row(rows.get(workload, {}), "tsrt", "cpu")
        return None if official is None or tsrt is None else (official, tsrt)

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
    for workload, name, limit in (("ct_fast", "--fast on example_ct", 1024), ("ct_total", "total on example_ct", 1536),
                                  ("phantom_fast", "512x512x800 phantom --fast", 2048)):
        low = find_row(rows.get(workload, {}), "tsrt", "cpu --low-memory")
        if low is not None:  # MB here are MiB (kB / 1024), as everywhere in these reports
            found.append({"target": f"{name} <= {limit / 1024:g} GB peak RSS with --low-memory",
                          "measured": f"{low['peak_rss_mb']:.0f} MB", "reached": low["peak_rss_mb"] <= limit})
    cpu_rows = {name: find_row(workload, "tsrt", "cpu") for name, workload in rows.items()}
    shares = {name: row["non_inference_share"] for name, row in cpu_rows.items()
              if row is not None and row.get("non_inference_share") is not None}
    if shares:
        worst = max(shares, key=shares.get)
        found.append({"target": "non-inference overhead <= 10 % of tsrt's wall time",
                      "measured": ", ".join(f"{k} {v * 100:.0f} %" for k, v in shares.items()),
                      "reached": shares[worst] <= 0.10})
    if (phantom := cpu_rows.get("phantom_fast")) is not None:
        peak = phantom["peak_rss_mb"]
        found.append({"target": "512x512x800 phantom --fast < 2 GB peak RSS", "measured": f"{peak:.0f} MB",
                      "reached": peak < 2048})
    return found


def network_per_tile(row: dict[str, Any] | None) -> float | None:
    """Seconds inside the network (every session.run) per tile of a tsrt row; None without both."""
    if row is None or not row.get("network_s") or not row.get("tiles"):
        return None
    return row["network_s"] / row["tiles"]


def precision_targets(report: Report) -> list[dict[str, Any]]:
    """Issue 19's goals for reduced precision, from the rows of one run: the network per 128^3 tile against ONNX
    Runtime fp32's (session.run time over tiles run, both in the same workload), and end-to-end ratios."""
    found = []
    rows = report["workloads"]
    engines = ("cpu", "openvino")

    def network_ratio(workload: dict, engine: str, precision: str) -> float | None:
        fp32, reduced = network_per_tile(find_row(workload, "tsrt", "cpu")), network_per_tile(
            find_row(workload, "tsrt", engine, precision))
        return None if fp32 is None or reduced is None else reduced / fp32

    for precision, goal in (("int8", 0.4), ("bf16", 1 / 1.8)):  # network time ratios: lower is faster
        for name, workload in rows.items():
            ratios = {e: r for e in engines if (r := network_ratio(workload, e, precision)) is not None}
            if not ratios:
                continue
            best = min(ratios.values())
            shown = (f"{ratio:.2f}x" if precision == "int8" else f"{1 / ratio:.2f}x faster" for ratio in ratios.values())
            target = ("int8 network per tile <= 0.4x ONNX Runtime fp32" if precision == "int8"
                      else "native bf16 network per tile >= 1.8x ONNX Runtime fp32")
            found.append({"target": f"{target} ({name})", "reached": best <= goal,
                          "measured": ", ".join(f"{e} {text}" for e, text in zip(ratios, shown))})
    for name, precision, goal in (("ct_total", "int8", 2.5), ("ct_fast", "int8", 6.0)):
        workload = rows.get(name, {})
        official = find_row(workload, "official")
        walls = {e: row["wall_s"] for e in engines if (row := find_row(workload, "tsrt", e, precision))}
        if official and walls:
            speedups = {e: official["wall_s"] / wall for e, wall in walls.items()}
            found.append({"target": f"{name} with int8 >= {goal:g}x faster than official",
                          "measured": ", ".join(f"{e} {v:.2f}x" for e, v in speedups.items()),
                          "reached": max(speedups.values()) >= goal})
    fast = rows.get("ct_fast", {})
    fp32, bf16 = find_row(fast, "tsrt", "cpu"), find_row(fast, "tsrt", "openvino", "bf16")
    if fp32 and bf16:
        speedup = fp32["wall_s"] / bf16["wall_s"]
        found.append({"target": "bf16 end to end --fast >= 1.6x tsrt cpu fp32", "measured": f"{speedup:.2f}x",
                      "reached": speedup >= 1.6})
    return found


def goal_table(title: str, goals: list[dict[str, Any]]) -> list[str]:
    """A Markdown table of goals: what, the measured value, whether it was reached."""
    return [f"| {title} | measured | reached |", "|---|---|---|"] + [
        f"| {t['target']} | {t['measured']} | {'yes' if t['reached'] else 'no'} |" for t in goals]


def machine_line(info: dict[str, Any]) -> str:
    """The header's machine: CPU model, cores, memory, and the flags reduced precision runs on."""
    flags = info.get("cpu_flags") or {"avx512_vnni": info.get("avx512_vnni"), "avx512_bf16": info.get("avx512_bf16"),
                                      "amx_bf16": info.get("amx")}  # reports from before cpu_flags
    named = ", ".join(f"{flag} {'yes' if flags[flag] else 'no'}" for flag in HEADER_FLAGS if flags.get(flag) is not None)
    engines = "; ".join(f"{name} {info[key]}" for name, key in (("ONNX Runtime", "onnxruntime"), ("OpenVINO", "openvino"))
                        if info.get(key))
    return (f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gb']} GB; CPU flags: {named}"
            + (f"; {engines}" if engines else "") + (f"; GPU: {info['gpu']}" if info.get("gpu") else ""))


def cell(value: float | None, pattern: str) -> str:
    return "–" if value is None else pattern.format(value)


def main_table(report: Report) -> list[str]:
    """Every workload's rows: backend, engine and precision in their own columns, stages, memory, accuracy."""
    header = ("| workload | backend | engine | precision | wall s | × vs reference | load models | read | preprocess "
              "| inference | postprocess | write | startup | tiles/s | network s/tile | peak RSS MB | outside network "
              "| agreement | Dice |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for name, rows in report["workloads"].items():
        accuracy = report["accuracy_random_weights"].get(name, {})
        references = {row["group"]: row["wall_s"] for row in rows.values() if row["backend"] in ("official", "nnunet")}
        for label, row in rows.items():
            backend, engine, precision = row_columns(row)
            reference = references.get(row["group"])
            ratio = f"{reference / row['wall_s']:.2f}×" if reference and row["wall_s"] else "–"
            stages = row["stages_s"]
            acc = accuracy.get(label, {})
            mark = " †" if precision in REDUCED_PRECISIONS else ""  # after a measured cell only
            gpu = f" (GPU {row['gpu_peak_mb']:.0f})" if row.get("gpu_peak_mb") else ""
            cells = [name, backend, engine, precision, f"{row['wall_s']:.1f}",
                     "ref" if row["backend"] in ("official", "nnunet") else ratio]
            cells += [f"{stages[s]:.1f}" if stages.get(s) else "–" for s in
                      ("load models", "read", "preprocess", "inference", "postprocess", "write", "startup")]
            cells += [cell(row.get("tiles_per_s"), "{:.2f}"), cell(network_per_tile(row), "{:.2f}"),
                      f"{row['peak_rss_mb']:.0f}{gpu}",
                      cell(row.get("non_inference_share"), "{:.0%}").replace("%", " %"),
                      cell(acc.get("agreement"), "{:.2%}").replace("%", " %") + (mark * (acc.get("agreement") is not None)),
                      cell(acc.get("dice"), "{:.4f}") + (mark * (acc.get("dice") is not None))]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def int8_table(report: Report) -> list[str]:
    """The int8 graphs the rows ran: each model's gate numbers (int8 vs fp32 on the held-out phantom), whether it
    passed or was forced, and what quantizing took."""
    lines = ["int8 graphs (`tsrt models quantize ... --force`, calibrated on phantoms, gated on a held-out one; "
             "random weights cannot pass the gate):", "",
             "| weights | model | gate | mean Dice | min Dice | agreement | tiles | form | quantize s | peak MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for weights, models in report["int8"].items():
        for model, gate in models.items():
            verdict = "passed" if gate["passed"] else "refused, forced"
            lines.append(f"| {weights} | {model} | {verdict} | {gate['mean_dice']:.4f} | {gate['min_dice']:.4f} | "
                         f"{gate['agreement']:.3%} | {gate['tiles']} | {gate['form']} | "
                         f"{cell(gate.get('quantize_s'), '{:.0f}')} | {cell(gate.get('quantize_peak_mb'), '{:.0f}')} |"
                         .replace("%", " %"))
    return lines + ["", "quantize s / peak MB: the whole `tsrt models quantize` call that made these graphs (for `total` "
                    "its five models together; peak: the process's PSS); – when they came from the cache.", ""]


def precision_cells(row: dict[str, Any]) -> list[str]:
    """vs, agreement, mean Dice, min Dice (class), classes: a row of precision_agreement's numbers."""
    if row.get("agreement") is None:
        return ["–", "–", cell(row.get("dice_vs_fp32"), "{:.4f}"), "–", "–"]  # earlier reports: mean Dice only
    lowest = f"{row['min_dice']:.4f} ({row['min_class']})" if row.get("min_dice") is not None else "–"
    return [row.get("reference", "cpu fp32"), f"{row['agreement']:.3%}".replace("%", " %"),
            cell(row.get("mean_dice"), "{:.4f}"), lowest, str(row.get("classes", "–"))]


def demo_engine_precision(key: str, row: dict[str, Any]) -> tuple[str, str]:
    """A demo row's engine and precision (earlier reports keyed rows by provider alone, e.g. openvino-bf16)."""
    from tsrt.engines.providers import DEPRECATED_PROVIDERS

    if "precision" in row:
        return row["provider"], row["precision"]
    return DEPRECATED_PROVIDERS.get(key, (key, "fp32"))


def markdown(report: Report) -> str:
    lines = [machine_line(report["machine"]) + "; load average at start "
             f"{', '.join(f'{x:.1f}' for x in report['machine']['load_average_at_start'])}; "
             f"{report['runs']} timed run(s) after {report['warmup']} warm-up round(s), medians"
             + "".join(f"; {name}: {n} run, no warm-up" for name, n in report.get("runs_capped", {}).items())
             + ".", "",
             f"Command: `{report['command']}`"
             + (f" (resuming the run of {report['resumed_from']})" if report.get("resumed_from") else ""), ""]
    lines += main_table(report)
    floor = report["random_weights_floor"]
    lines += ["", f"Random weights: float noise alone caps agreement at about {floor * 100:.1f} % "
              "(near-tied logits); the confident-weights tables below are the accuracy check.",
              "† Reduced precision on random weights: agreement and Dice measure rounding on near-ties, not accuracy "
              "(not meaningful; their int8 graphs were installed with --force past the accuracy gate, which random "
              "weights cannot pass); these rows are for speed. Accuracy: the precision tables below.",
              "Official TotalSegmentator's `preprocess` includes nnU-Net's own pipeline around the network "
              "(worker start-up, preprocessing, export in worker processes); `startup` is process start and imports.",
              ""]
    if report.get("skipped_rows"):
        lines += ["Rows not run on this machine:", ""] + [f"- {k}: {v}" for k, v in report["skipped_rows"].items()] + [""]
    if report.get("failures"):
        lines += ["Failed runs (left out above):", ""] + [f"- {k}: {v}" for k, v in report["failures"].items()] + [""]
    if report.get("targets"):
        lines += goal_table("target (tsrt cpu, fp32)", report["targets"]) + [""]
    if goals := precision_targets(report):
        lines += goal_table("reduced precision goal (issue 19)", goals)
        lines += ["", "Network per tile: the time inside session.run (body and output layer) over the tiles run, "
                  "against tsrt cpu fp32's in the same workload and run.", ""]
    if report.get("int8"):
        lines += int8_table(report)
    if report.get("accuracy_confident"):
        lines += ["Confident weights (trained demo backbone, 128³ patches), Dice vs official TotalSegmentator:", "",
                  "| workload | backend | engine | precision | agreement | mean Dice | classes |",
                  "|---|---|---|---|---|---|---|"]
        for name, rows in report["accuracy_confident"].items():
            for label, acc in rows.items():
                backend, engine, precision = row_columns(acc if "backend" in acc else legacy_row(label))
                lines.append(f"| {name} | {backend} | {engine} | {precision} | {acc['agreement'] * 100:.3f} % | "
                             f"{acc['dice']:.4f} | {acc.get('classes', '–')} |")
        lines.append("")
    if report.get("precision_confident"):
        lines += ["Reduced precision vs fp32 on confident weights (trained demo backbone, 128³ patches, TotalSegmentator's "
                  "layout): voxel agreement, and Dice per class over the classes with >= 1000 fp32 voxels (mean, lowest); "
                  "each precision against its own engine's fp32, fp32 engines against cpu fp32:", "",
                  "| workload | engine | precision | vs | agreement | mean Dice | min Dice (class) | classes |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, rows in report["precision_confident"].items():
            for row in rows.values():
                lines.append("| " + " | ".join([name, row["provider"], row["precision"], *precision_cells(row)]) + " |")
        lines.append("")
    if report.get("demo_precision"):
        lines += ["Trained demo model on an unseen phantom, each precision vs fp32 (agreement; Dice per class over classes "
                  "with >= 1000 fp32 voxels) and vs the phantom's truth (mean over its 8 organs, of which the demo model "
                  "has learned only some):", "",
                  "| engine | precision | inference s | speed-up vs cpu fp32 | vs | agreement | mean Dice | "
                  "min Dice (class) | classes | Dice vs truth |", "|---|---|---|---|---|---|---|---|---|---|"]
        for key, row in report["demo_precision"].items():
            engine, precision = demo_engine_precision(key, row)
            is_reference = (engine, precision) == ("cpu", "fp32")
            reference = ["ref", "–", "–", "–", "–"] if is_reference else precision_cells(row)
            lines.append("| " + " | ".join([engine, precision, f"{row['inference_s']:.2f}",
                                            f"{row['speedup_vs_cpu']:.2f}×", *reference,
                                            f"{row['dice_vs_truth']:.4f}"]) + " |")
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
