"""One timed segmentation by one backend, in its own process; prints one JSON line (see speed.py).

    python benchmarks/backend_child.py JOB.json

JOB: {"backend": "official" | "nnunet" | "tsrt" | "tsrt-model", "input", "output", "task", "fast",
"provider", "precision", "model_dir"}; tsrt rows also print the provider and precision their
sessions ran (speed.py fails a row that ran another). Stage times are charged to whichever stage is
current: the pipelines' own functions are wrapped with timers here (measurement only, results are
untouched). A file with a main guard, not `python -c`: nnU-Net's worker processes re-import __main__.
"""

from __future__ import annotations

import functools
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

from memory import vmhwm_mb
from workloads import CPU_PROVIDERS

STARTED = time.perf_counter()


class StageClock:
    """Charges elapsed time to the current stage; wrapped calls switch stage for their duration.

    Between wrapped calls the stage is `preprocess` until the first network call and `postprocess`
    after it, so the pipelines' glue (crops, reorientation, merging parts) lands where it belongs.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.stage = "startup"
        self.mark = STARTED
        self.inference_seen = False
        self.tiles = 0

    def glue(self) -> str:
        return "postprocess" if self.inference_seen else "preprocess"

    def switch(self, stage: str) -> str:
        now = time.perf_counter()
        self.seconds[self.stage] = self.seconds.get(self.stage, 0.0) + now - self.mark
        previous, self.stage, self.mark = self.stage, stage, now
        return previous

    def inside(self, owner: object, name: str, stage: str | Callable[[], str], *, then_glue: bool = False) -> None:
        """Wrap owner.name so its calls count as `stage` (or stage() per call); then back, or to the glue stage."""
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            previous = self.switch(stage() if callable(stage) else stage)
            try:
                return original(*args, **kwargs)
            finally:
                self.switch(self.glue() if then_glue else previous)

        setattr(owner, name, timed)

    def report(self) -> dict[str, float]:
        self.switch(self.stage)
        return {stage: round(seconds, 4) for stage, seconds in self.seconds.items() if seconds > 0}


CLOCK = StageClock()


def _no_network() -> None:
    """Official TotalSegmentator must not phone home (usage statistics, update checks) during a benchmark."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OSError("network disabled in this benchmark")

    connect = socket.socket.connect

    def local_only(self: socket.socket, address: Any) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError("network disabled in this benchmark")
        return connect(self, address)

    socket.getaddrinfo, socket.socket.connect = refuse, local_only


def run_official(job: dict[str, Any]) -> dict[str, Any]:
    _no_network()
    import nibabel
    import totalsegmentator.nnunet as ts_nnunet  # its nnUNetPredictor patch first, as TotalSegmentator runs
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from totalsegmentator.python_api import totalsegmentator

    _time_nnunet_predictor(nnUNetPredictor)
    CLOCK.inside(ts_nnunet, "change_spacing", CLOCK.glue, then_glue=True)
    # nnU-Net's own pipeline around the network (worker start-up, preprocessing, export in workers).
    CLOCK.inside(nnUNetPredictor, "predict_from_files", "preprocess", then_glue=True)
    CLOCK.inside(nibabel, "save", lambda: "write" if CLOCK.inference_seen else "preprocess")
    CLOCK.switch("read")  # until TotalSegmentator first resamples: loading and checking the input
    totalsegmentator(
        job["input"], job["output"], ml=True, fast=job["fast"], task=job["task"],
        device="gpu" if job.get("gpu") else "cpu", quiet=True, nr_thr_saving=1,
    )
    return {}


def _time_nnunet_predictor(predictor_class: type) -> None:
    """nnU-Net's sliding window is the inference stage; its slicer count is the tile count."""
    sliding = predictor_class.predict_sliding_window_return_logits

    @functools.wraps(sliding)
    def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
        CLOCK.inference_seen = True
        previous = CLOCK.switch("inference")
        try:
            return sliding(self, *args, **kwargs)
        finally:
            CLOCK.switch(previous)

    slicers = predictor_class._internal_get_sliding_window_slicers

    @functools.wraps(slicers)
    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        found = slicers(self, *args, **kwargs)
        CLOCK.tiles += len(found)
        return found

    predictor_class.predict_sliding_window_return_logits = timed
    predictor_class._internal_get_sliding_window_slicers = counted


def run_nnunet(job: dict[str, Any]) -> dict[str, Any]:
    """nnU-Net's own predictor on one exported model's source folder, in this process (no workers)."""
    import torch
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    _time_nnunet_predictor(nnUNetPredictor)
    predictor = nnUNetPredictor(tile_step_size=job["step_size"], use_mirroring=False, device=torch.device("cpu"),
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(job["model_dir"], use_folds=(0,))
    CLOCK.switch("read")
    io = SimpleITKIO()
    data, properties = io.read_images([job["input"]])
    CLOCK.switch("preprocess")
    labels = predictor.predict_single_npy_array(data, properties, None, None, False)
    CLOCK.switch("write")
    io.write_seg(labels, job["output"], properties)
    return {}


def run_tsrt(job: dict[str, Any]) -> dict[str, Any]:
    """tsrt's TotalSegmentator task path, as `tsrt segment --ml` runs it."""
    # The modules whose globals the task path calls: timing wrappers replace functions there.
    import tsrt.totalseg.runner as runner_module
    import tsrt.totalseg.task as task_module
    from tsrt.totalseg.options import SegmentOptions
    from tsrt.totalseg.source import read_source

    network = {"seconds": 0.0}
    original_predict = runner_module.predict_array

    def predict_array(*args: Any, **kwargs: Any) -> Any:
        """Charge one model call to tsrt's own stage timings of it (its remainder to postprocess)."""
        previous = CLOCK.switch("model call")
        prediction = original_predict(*args, **kwargs)
        CLOCK.switch(previous)
        CLOCK.inference_seen = True
        total = CLOCK.seconds.pop("model call")
        for stage in ("preprocess", "inference", "postprocess"):
            CLOCK.seconds[stage] = CLOCK.seconds.get(stage, 0.0) + prediction.seconds[stage]
            total -= prediction.seconds[stage]
        CLOCK.seconds["postprocess"] += max(total, 0.0)
        network["seconds"] += prediction.seconds["network"]
        return prediction

    runner_module.predict_array = predict_array
    CLOCK.inside(runner_module, "resample_input", "preprocess", then_glue=True)
    for name in ("postprocess_lowres", "restore_input_grid", "finalize_labels"):
        CLOCK.inside(runner_module, name, "postprocess", then_glue=True)
    CLOCK.inside(task_module, "write_task_outputs", "write")
    cpu = job["provider"] in CPU_PROVIDERS
    request, runner, options = task_module.prepare_run(SegmentOptions(
        task=job["task"], fast=job["fast"], ml=True, provider=job["provider"], precision=job.get("precision", "fp32"),
        quiet=True, device="cpu" if cpu else None, low_memory=job.get("low_memory", False),
    ))
    CLOCK.inside(runner, "model", "load models")
    CLOCK.switch("read")
    source = read_source(job["input"])
    CLOCK.switch("preprocess")
    task_module.segment_source(source, request, runner, Path(job["output"]), options)
    CLOCK.tiles = runner.tiles_run
    return {"network_s": network["seconds"], "provider": runner.provider_used, "precision": runner.precision_used}


def run_tsrt_model(job: dict[str, Any]) -> dict[str, Any]:
    """tsrt with one exported model folder (`tsrt segment --model`), the counterpart of nnUNetPredictor."""
    from tsrt.api import write_model_segmentation
    from tsrt.pipeline.infer import InferenceSettings, load_model
    from tsrt.pipeline.read import read_image

    CLOCK.switch("load models")
    model = load_model(Path(job["model_dir"]), provider=job["provider"], precision=job.get("precision", "fp32"),
                       low_memory=job.get("low_memory", False))
    CLOCK.switch("read")
    image = read_image(job["input"])
    CLOCK.switch("done")
    settings = InferenceSettings(step_size=job["step_size"], use_mirroring=False, progress=False)
    run = write_model_segmentation(image, model, Path(job["output"]), settings)
    CLOCK.seconds.update({stage: run.seconds[stage] for stage in ("preprocess", "inference", "postprocess", "write")})
    CLOCK.tiles = model.tiles_run
    return {"network_s": run.seconds["network"], "provider": model.provider_used, "precision": model.precision_used}


RUNNERS = {"official": run_official, "nnunet": run_nnunet, "tsrt": run_tsrt, "tsrt-model": run_tsrt_model}


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    extra = RUNNERS[job["backend"]](job)
    stages = CLOCK.report()
    stages.pop("done", None)
    print(json.dumps({
        "in_process_s": time.perf_counter() - STARTED, "stages": stages, "tiles": CLOCK.tiles,
        "vmhwm_mb": vmhwm_mb(), **extra,
    }), flush=True)


if __name__ == "__main__":
    main()
