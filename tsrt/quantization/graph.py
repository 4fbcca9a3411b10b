"""One int8 QDQ graph from an fp32 graph, by ONNX Runtime's static quantization, with what must stay float kept float.

The graph is QDQ (QuantizeLinear/DequantizeLinear around float ops), the one int8 form ONNX Runtime's CPU
provider fuses into integer kernels and OpenVINO reads as its own int8 (FakeQuantize) ops. Activations are
uint8 per tensor (OpenVINO read int8 activations badly: 86 % agreement), weights int8 per output channel,
convolutions only. Kept float: the output layer (the final 1x1x1 convolution: logits of range ~1000, which
quantized dropped agreement to 95 %), and ConvTranspose (neither engine runs it in int8).

The `tensorrt` form is what TensorRT's explicit quantization reads (it quantizes symmetrically only): int8
activations with zero point 0, weights kept float with a Q/DQ pair each (TensorRT quantizes them with those
scales), biases float (TensorRT has no int32 dequantization). ONNX Runtime and OpenVINO run it too; on the demo
model it agreed with fp32 in 99.7 % (ORT) and 99.1 % (OpenVINO) of the voxels, vs 99.8 % for both in the default form.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tsrt.errors import ModelError
from tsrt.quantization.calibration import TileReader

#: ONNX Runtime's calibration methods, by tsrt's names. On the demo model percentile (99.999 %) and entropy gave
#: the same Dice, minmax less; clipping harder (99.99 %, 99.9 %) lost Dice: the activations' tails carry the labels.
METHODS = ("percentile", "entropy", "minmax")
DEFAULT_METHOD = "percentile"
#: The only op type quantized: 3-D convolutions hold nearly all the arithmetic.
QUANTIZED_OPS = ("Conv",)
#: The Q/DQ forms a graph can be written in: for ONNX Runtime's CPU kernels and OpenVINO, or for TensorRT.
FORMS = ("cpu", "tensorrt")


def output_layer(model: Any) -> str:
    """The name of the convolution that makes the graph's output (the segmentation head)."""
    producers = {output: node for node in model.graph.node for output in node.output}
    name = model.graph.output[0].name
    while name in producers:
        node = producers[name]
        if node.op_type == "Conv":
            return node.name
        if len(node.input) != 1:  # only pass-through ops (Identity, Cast, ...) may follow the head
            break
        name = node.input[0]
    raise ModelError("The graph's output is not made by a convolution (an nnU-Net head): tsrt cannot quantize it.")


def without_weight_aliases(model: Any) -> Any:
    """The model with Identity nodes that only rename an initializer removed (the torch exporter writes one per
    shared weight: TotalSegmentator's graphs have ~60). ONNX Runtime quantizes only weights that are
    initializers, and a conv whose weight is not stays float, without int8 kernel: measured 1.9x slower."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    outputs = {output.name for output in model.graph.output}
    alias = {
        node.output[0]: node.input[0] for node in model.graph.node
        if node.op_type == "Identity" and node.input[0] in initializers and node.output[0] not in outputs
    }
    kept = [node for node in model.graph.node if not (node.op_type == "Identity" and node.output[0] in alias)]
    for node in kept:
        for index, name in enumerate(node.input):
            node.input[index] = alias.get(name, name)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return model


def float_nodes(model: Any) -> list[str]:
    """Nodes left in float: the output layer and every transposed convolution."""
    return [output_layer(model), *(node.name for node in model.graph.node if node.op_type == "ConvTranspose")]


@contextlib.contextmanager
def quiet_onnxruntime() -> Iterator[None]:
    """ONNX Runtime's quantization prints to stdout and warns on the root logger; tsrt says what matters itself."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


def write_qdq_graph(
    source: Path, target: Path, tiles: np.ndarray, input_name: str, method: str = DEFAULT_METHOD,
    on_tile: Callable[[], None] | None = None, form: str = "cpu",
) -> dict[str, Any]:
    """Quantize `source` into `target` calibrated on `tiles`, in `form` (FORMS); returns how (for the plan's record)."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in METHODS:
        raise ModelError(f"Unknown calibration method {method!r}: choose {', '.join(METHODS[:-1])} or {METHODS[-1]}.")
    if form not in FORMS:
        raise ModelError(f"Unknown int8 form {form!r}: choose {' or '.join(FORMS)}.")
    tensorrt = form == "tensorrt"
    # One tile per calibration run: memory is one tile's activations (~9 GB at 128^3), not all tiles'.
    options: dict[str, Any] = {"CalibStridedMinMax": 1}
    if tensorrt:
        options.update(ActivationSymmetric=True, WeightSymmetric=True, AddQDQPairToWeight=True, QuantizeBias=False)
    model = without_weight_aliases(onnx.load(str(source)))
    kept = float_nodes(model)
    calibration = {"percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy,
                   "minmax": CalibrationMethod.MinMax}[method]
    with quiet_onnxruntime():
        quantize_static(
            model, str(target), TileReader(tiles, input_name, on_tile), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS), per_channel=True, reduce_range=False,
            activation_type=QuantType.QInt8 if tensorrt else QuantType.QUInt8, weight_type=QuantType.QInt8,
            nodes_to_exclude=kept, calibrate_method=calibration, extra_options=options,
        )
    return {
        "format": "QDQ", "form": form,
        "activations": "int8 symmetric per tensor" if tensorrt else "uint8 per tensor",
        "weights": "int8 symmetric per output channel (float, Q/DQ pair)" if tensorrt else "int8 per output channel",
        "quantized_ops": list(QUANTIZED_OPS), "float_nodes": kept, "method": method,
        "tool": f"onnxruntime {onnxruntime.__version__} quantize_static",
    }


def qdq_node_counts(graph: Path) -> dict[str, int]:
    """How many QuantizeLinear / DequantizeLinear nodes a graph holds (0 for a float graph)."""
    import onnx

    nodes = onnx.load(str(graph), load_external_data=False).graph.node
    return {op: sum(node.op_type == op for node in nodes) for op in ("QuantizeLinear", "DequantizeLinear")}


def check_engines(graph: Path, tile: np.ndarray, input_name: str, output_name: str) -> dict[str, str]:
    """Run one tile through the graph on ONNX Runtime's CPU provider and, when installed, OpenVINO: both must
    read it and give finite logits of the tile's shape. Returns each engine's version (OpenVINO: or why not)."""
    import onnxruntime

    engines: dict[str, str] = {}
    session = onnxruntime.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    _check_logits("ONNX Runtime", graph, session.run([output_name], {input_name: tile[None]})[0], tile)
    engines["onnxruntime"] = onnxruntime.__version__
    try:
        import openvino
    except ModuleNotFoundError:
        engines["openvino"] = "not installed (pip install 'tsrt[openvino]' to check it too)"
        return engines
    try:
        compiled = openvino.Core().compile_model(str(graph), "CPU")
        logits = compiled([tile[None]])[compiled.output(output_name)]
    except RuntimeError as error:  # OpenVINO's own exceptions derive from it
        reason = " ".join(str(error).split())[:200]
        raise ModelError(f"OpenVINO could not run the int8 graph ({reason}); nothing was installed: report this as "
                         "a tsrt bug, or uninstall openvino to quantize for ONNX Runtime alone.") from None
    _check_logits("OpenVINO", graph, logits, tile)
    engines["openvino"] = openvino.__version__
    return engines


def _check_logits(engine: str, graph: Path, logits: np.ndarray, tile: np.ndarray) -> None:
    if logits.shape[2:] != tile.shape[1:] or not np.isfinite(logits).all():
        raise ModelError(f"{engine} ran {graph.name} into logits of shape {logits.shape} (finite: "
                         f"{bool(np.isfinite(logits).all())}); nothing was installed: report this as a tsrt bug.")
