"""Inference: an exported model's folds on ONNX Runtime, ensembled per tile, streamed over the volume.

nnU-Net runs each fold over the whole volume and averages the fold logits. Averaging is linear,
so averaging per tile before the Gaussian accumulation gives the same logits while the volume is
traversed once; that is what lets the sliding window stream.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tsrt.errors import ModelError
from tsrt.progress import progress
from tsrt.models.plan import RecordedPlan, load_model_plans
from tsrt.pipeline.preprocess import Preprocessed
from tsrt.engines.head import HEAD_INPUT, HEAD_OUTPUT, split_output_head
from tsrt.engines.openvino_graph import openvino_graph
from tsrt.engines.providers import ProviderChoice, choose_provider, create_session, output_layer_choice
from tsrt.engines.slabs import open_slabbed_body
from tsrt.models.store import gated_int8_graphs, recorded_graph_sha256
from tsrt.pipeline.sliding_window import LabelSink, SlabConsumer, count_tiles, sliding_window_inference

log = logging.getLogger("tsrt")


@dataclass
class InferenceSettings:
    """How to run the sliding window. Defaults are nnUNetv2_predict's."""

    step_size: float = 0.5
    use_mirroring: bool = True  # only where the checkpoint allows it
    batch_size: int = 1
    accumulation: str = "float16"  # nnU-Net's float16 buffers, reproduced exactly; or "float32"
    progress: bool = True
    # Called with (tiles finished, tiles in total) after each batch: progress for a UI, not a terminal.
    on_tiles: Callable[[int, int], None] | None = None


@dataclass
class LoadedModel:
    """An exported model folder with one ONNX Runtime session per fold."""

    directory: Path
    plans: list[RecordedPlan]
    provider: ProviderChoice
    sessions: list = field(default_factory=list)
    #: Per fold, when the graph was split before its pointwise output layer (tsrt.engines.head): the body's
    #: output (the last features) and the head's session. Empty: the sessions return the logits.
    feature_outputs: list[str] = field(default_factory=list)
    heads: list = field(default_factory=list)
    seconds_in_network: float = 0.0  # time spent inside session.run, for the overhead report
    tiles_run: int = 0  # tiles through the network (a mirrored copy counts, folds do not), for tiles/s

    @property
    def plan(self) -> RecordedPlan:
        return self.plans[0]

    @property
    def provider_used(self) -> str:
        """The provider the sessions actually run on (`auto` may have fallen back)."""
        return self.sessions[0].provider_name if self.sessions else self.provider.name

    @property
    def precision_used(self) -> str:
        """The arithmetic the sessions run (for the run manifest): an fp16 graph's own, else what the
        provider was asked for, or fp32 when `auto` fell back to another provider."""
        if self.plan.graph_precision == "fp16":
            return "fp16"
        return self.provider.precision if self.provider_used == self.provider.name else "fp32"

    def predict_tiles(self, tiles: np.ndarray) -> np.ndarray:
        """Logits of every fold for a batch of tiles: (N, C_in, *patch) -> (F, N, C_out, *patch)."""
        if not self.heads:
            return self.tile_features(tiles)
        features = self.tile_features(tiles)
        return np.stack([self.apply_heads(features[:, n]) for n in range(features.shape[1])], axis=1)

    def tile_features(self, tiles: np.ndarray) -> np.ndarray:
        """What the sessions return for a batch of tiles, per fold: the logits, or with `heads` the last features
        (float16 from OpenVINO's bf16 and int8 bodies)."""
        started = time.perf_counter()
        names = self.feature_outputs or [plan.graph_output_name for plan in self.plans]
        outputs = [
            session.run([name], {plan.graph_input_name: tiles})[0]
            for session, plan, name in zip(self.sessions, self.plans, names)
        ]
        self.seconds_in_network += time.perf_counter() - started
        self.tiles_run += int(tiles.shape[0])
        # One fold (TotalSegmentator's case) needs no copy: a 118-class 128^3 tile is ~1 GB.
        return outputs[0][None] if len(outputs) == 1 else np.stack(outputs)

    def apply_heads(self, features: np.ndarray) -> np.ndarray:
        """Logits of a block of rows from the body's features: (F, C_feat, rows, ...) -> (F, C, rows, ...)."""
        started = time.perf_counter()
        # float32 in: OpenVINO's reduced-precision bodies hand over float16 features (tsrt.engines.openvino_graph).
        logits = [head.run([HEAD_OUTPUT], {HEAD_INPUT: np.asarray(features[f][None], dtype=np.float32)})[0][0]
                  for f, head in enumerate(self.heads)]
        self.seconds_in_network += time.perf_counter() - started
        return logits[0][None] if len(logits) == 1 else np.stack(logits)


def load_model(
    model_dir: Path,
    *,
    folds: Sequence[str | int] | None = None,
    provider: str | ProviderChoice = "auto",
    device: str | None = None,
    threads: int | None = None,
    precision: str = "fp32",
    graphs: Sequence[Path] | None = None,
    low_memory: bool = False,
) -> LoadedModel:
    """Read the recorded plans of the chosen folds and open their graphs on the chosen provider.

    `low_memory`: run each body's large feature maps a few rows at a time (tsrt.engines.slabs): the same
    features bit for bit in about half the peak memory, slower (measured on --fast example_ct with the
    TotalSegmentator-sized net: 965 vs 1794 MiB, 6.7 vs 5.9 s). ONNX Runtime's CPU in fp32 only;
    elsewhere it says so in one line and runs as usual.

    `graphs` (one per fold) replaces the graphs the plans name: `tsrt models quantize` gates candidate
    int8 graphs this way before they are installed.
    """
    plans = load_model_plans(Path(model_dir), None if folds is None else [str(f) for f in folds])
    wanted = provider.precision if isinstance(provider, ProviderChoice) else precision
    if graphs is None:  # int8: the gated graphs, refused (one line) before a provider is chosen and named
        graphs = check_int8_model(Path(model_dir), plans) if wanted == "int8" else [_exported_graph(p) for p in plans]
    if isinstance(provider, ProviderChoice):
        choice = provider
    else:
        graph_precision = "int8" if wanted == "int8" else plans[0].graph_precision
        choice = choose_provider(
            provider, precision=precision, device=device, fp16=graph_precision == "fp16", threads=threads,
            graph_precision=graph_precision,
        )
        if choice.name == "tensorrt":
            choice = _with_engine_cache(choice, Path(model_dir), device, threads, graphs)
    model = LoadedModel(directory=Path(model_dir), plans=plans, provider=choice)
    hashes = [recorded_graph_sha256(graph) if choice.name in SPLIT_HEAD_PROVIDERS else None for graph in graphs]
    splits = [
        split_output_head(graph, sha256) if sha256 and can_split_head(plan) else None
        for graph, plan, sha256 in zip(graphs, plans, hashes)
    ]

    def open_graph(graph: Path, sha256: str | None, body: bool = False, engine: ProviderChoice = choice):
        if engine.uses_openvino and sha256:
            graph = openvino_graph(graph, sha256, engine.precision, body)  # the form OpenVINO runs leanest
        # A body's features are used up (the head run on them) before the next tile runs: no copy needed.
        return create_session(graph, engine, threads=threads, graph_sha256=sha256, share_outputs=body)

    if all(split is not None for split in splits):  # every fold split, or none: folds are averaged alike
        slabbed = _slabbed_bodies(splits, plans, choice, threads) if low_memory else None
        for number, split in enumerate(splits):
            model.sessions.append(slabbed[number] if slabbed else open_graph(split.body, split.body_sha256, body=True))
            model.heads.append(open_graph(split.head, split.head_sha256, engine=output_layer_choice(choice)))
            model.feature_outputs.append(split.body_output)
    else:
        if low_memory:
            log.info("--low-memory: this model cannot be run in slabs (2-D, mirrored or no separate output layer); "
                     "running as usual")
        model.sessions = [open_graph(graph, sha256) for graph, sha256 in zip(graphs, hashes)]
    return model


def check_int8_model(
    model_dir: Path, plans: list[RecordedPlan] | None = None, folds: Sequence[str | int] | None = None,
    provider: str = "auto",
) -> list[Path]:
    """`--precision int8` on an exported model: its gated int8 graphs, each only while its bytes are the ones
    its plan recorded at the gate (on `provider` tensorrt: in TensorRT's symmetric form); else one line naming
    the `tsrt models quantize` call that makes them (callers check before reading any image)."""
    if plans is None:
        plans = load_model_plans(Path(model_dir), None if folds is None else [str(f) for f in folds])
    graphs = gated_int8_graphs(Path(model_dir), plans)
    if provider == "tensorrt":
        from tsrt.engines.tensorrt import check_tensorrt_int8_graphs

        check_tensorrt_int8_graphs(Path(model_dir), graphs)
    return graphs


def _exported_graph(plan: RecordedPlan) -> Path:
    if not plan.graph_path.exists():
        raise ModelError(f"Graph {plan.graph_path} named by {plan.path} is missing: re-export the model.")
    return plan.graph_path


#: Providers whose runs use a separate output layer (GPU providers keep the whole graph: memory is not their limit).
SPLIT_HEAD_PROVIDERS = ("cpu", "openvino")


def _slabbed_bodies(splits: list, plans: Sequence[RecordedPlan], choice: ProviderChoice, threads: int | None) -> list | None:
    """`--low-memory`: every fold's body run in slabs (tsrt.engines.slabs), or None (said in one line) when the
    provider, the precision or one fold's network does not allow it: folds are averaged alike, so all or none.
    Slabs run on ONNX Runtime's CPU in float32, where they give the whole graph's features bit for bit."""
    if not (choice.name == "cpu" and choice.precision == "fp32" and all(p.graph_precision == "fp32" for p in plans)):
        log.info("--low-memory: applies to --provider cpu at --precision fp32 only; running as usual")
        return None
    bodies = []
    for split, plan in zip(splits, plans):
        body = open_slabbed_body(split.body, split.body_sha256, choice, threads, tuple(plan.patch_size[1:]))
        if body is None:
            log.info("--low-memory: this model's network has a shape tsrt cannot run in slabs; it runs whole")
            return None
        bodies.append(body)
    log.info("--low-memory: %d resolution level(s) run in slabs of rows", bodies[0].levels)
    return bodies


def can_split_head(plan: RecordedPlan) -> bool:
    """Whether runs of this plan can use a separate output layer: 3d patches, no test-time mirroring
    (mirrored predictions are averaged as logits, which needs a tile's whole logits)."""
    return len(plan.patch_size) == 3 and not plan.allowed_mirroring_axes


def _with_engine_cache(
    choice: ProviderChoice, model_dir: Path, device: str | None, threads: int | None, graphs: Sequence[Path]
) -> ProviderChoice:
    """Point TensorRT at this model's engines of the precision asked for, the folder `tsrt engine build` fills
    (never switched by what is cached); int8 only from gated graphs TensorRT can build (one line otherwise)."""
    from tsrt.engines.tensorrt import check_tensorrt_int8_graphs, tensorrt_choice

    if choice.precision == "int8":
        check_tensorrt_int8_graphs(model_dir, graphs)
    return tensorrt_choice(model_dir, choice.precision, requested=choice.requested, device=device, threads=threads)


def predict_streaming(
    model: LoadedModel,
    preprocessed: Preprocessed,
    consume_slab: SlabConsumer,
    settings: InferenceSettings,
    progress_description: str = "tiles",
    labels: LabelSink | None = None,
) -> None:
    """Run the sliding window over the preprocessed volume, handing finished logit slabs (or, for an image of
    one tile, argmax labels to `labels` when given) on."""
    plan = model.plan
    mirror_axes = plan.allowed_mirroring_axes if settings.use_mirroring else None
    n_tiles = count_tiles(preprocessed.data.shape[1:], plan.patch_size, settings.step_size)
    head = model.apply_heads if model.heads and not mirror_axes else None
    with progress(progress_description, n_tiles, enabled=settings.progress, transient=True) as advance:
        if settings.on_tiles is not None:
            advance = _also_reporting(advance, settings.on_tiles, n_tiles)
        sliding_window_inference(
            preprocessed.data,
            model.tile_features if head is not None else model.predict_tiles,
            plan.patch_size,
            plan.num_segmentation_heads,
            consume_slab,
            step_size=settings.step_size,
            batch_size=settings.batch_size,
            mirror_axes=mirror_axes,
            accumulation=settings.accumulation,
            progress=advance,
            head=head,
            labels=labels,
        )


def _also_reporting(advance: Callable[[int], None], on_tiles: Callable[[int, int], None], total: int) -> Callable[[int], None]:
    """Wrap a bar's advance(n) so `on_tiles` also hears the running count."""
    finished = 0

    def both(n: int) -> None:
        nonlocal finished
        finished += n
        advance(n)
        on_tiles(finished, total)

    return both


