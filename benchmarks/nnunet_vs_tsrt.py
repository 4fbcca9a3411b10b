"""nnU-Net's own predictor vs tsrt on the same result folder and image: wall time, peak RSS, agreement.

Each backend runs in its own child process (so peak RSS is that backend's alone), alternating
A B A B for --runs rounds after one warm-up. Reports medians, the share of tsrt's wall time spent
outside `session.run`, and label agreement. Needs the dev extras (torch, nnunetv2).

    python benchmarks/nnunet_vs_tsrt.py --image ../shared/data/example_ct.nii.gz --classes 118 --out results/
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
mode, folder, exported, image, out, step = sys.argv[1:7]
step = float(step)
started = time.perf_counter()
if mode == "nnunet":
    import numpy as np, torch
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    torch.set_num_threads(torch.get_num_threads())
    predictor = nnUNetPredictor(tile_step_size=step, use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(folder, use_folds=(0,))
    data, props = SimpleITKIO().read_images([image])
    seg = predictor.predict_single_npy_array(data, props, None, None, False)
    np.save(out, seg.transpose(2, 1, 0))
    extra = {}
else:
    import numpy as np
    from tsrt.api import segment_image_with_model
    from tsrt.infer import InferenceSettings, load_model
    from tsrt.read import read_image
    model = load_model(exported, provider="cpu")
    run = segment_image_with_model(read_image(image), model, InferenceSettings(step_size=step, use_mirroring=False, progress=False))
    np.save(out, run.labels)
    extra = {"stage_seconds": run.seconds}
wall = time.perf_counter() - started
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child would inherit its parent's peak.
peak_mb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024
print(json.dumps({"wall_s": wall, "peak_rss_mb": peak_mb, **extra}))
"""


def run_child(mode: str, folder: Path, exported: Path, image: Path, out: Path, step: float) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(folder), str(exported), str(image), str(out), str(step)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--classes", type=int, default=118, help="output classes incl. background")
    parser.add_argument("--stages", type=int, default=5)
    parser.add_argument("--max-features", type=int, default=128)
    parser.add_argument("--patch", type=int, nargs=3, default=(96, 96, 96))
    parser.add_argument("--spacing", type=float, nargs=3, default=(3.0, 3.0, 3.0))
    parser.add_argument("--step", type=float, default=0.5)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)

    import numpy as np

    from tsrt_export.fixtures import write_result_folder
    from tsrt_export.onnx_export import export_model

    work = Path(tempfile.mkdtemp(prefix="tsrt-bench-"))
    labels = {"background": 0, **{f"class_{i}": i for i in range(1, args.classes)}}
    features = [min(16 * 2**i, args.max_features) for i in range(args.stages)]
    folder = write_result_folder(
        work / "results", n_stages=args.stages, features=features, patch_size=args.patch, spacing=args.spacing, labels=labels
    )
    exported = work / "exported"
    export_model(folder, exported, progress=False)

    rows: dict[str, list[dict]] = {"nnunet": [], "tsrt": []}
    for round_index in range(args.runs + 1):  # the first round is a warm-up
        for mode in ("nnunet", "tsrt"):
            measured = run_child(mode, folder, exported, args.image, work / f"{mode}.npy", args.step)
            if round_index:
                rows[mode].append(measured)
    ours, theirs = np.load(work / "tsrt.npy"), np.load(work / "nnunet.npy")

    def median(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in rows[mode])

    network = statistics.median(r["stage_seconds"]["network"] for r in rows["tsrt"])
    report = {
        "image": str(args.image),
        "network": {"stages": args.stages, "features": features, "patch": list(args.patch), "classes": args.classes},
        "runs": args.runs,
        "nnunet": {"wall_s": median("nnunet", "wall_s"), "peak_rss_mb": median("nnunet", "peak_rss_mb")},
        "tsrt": {"wall_s": median("tsrt", "wall_s"), "peak_rss_mb": median("tsrt", "peak_rss_mb"), "network_s": network},
        "speedup": median("nnunet", "wall_s") / median("tsrt", "wall_s"),
        "tsrt_share_outside_session_run": 1.0 - network / median("tsrt", "wall_s"),
        "voxel_agreement": float((ours == theirs).mean()),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / f"nnunet_vs_tsrt_{time.strftime('%Y%m%d-%H%M%S')}.json"
    target.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"peak RSS of this script's children: {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
