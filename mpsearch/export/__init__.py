"""Writers that turn a plan into files a runtime or toolchain accepts: the QDQ ONNX model
(:mod:`.qdq`, with its legality check, opset handling and fp8-safe clips), channel-pruned
layers made physically smaller (:mod:`.channels`), AIMET/QNN encodings (:mod:`.encodings`),
ONNX Runtime tensor overrides (:mod:`.overrides`), and reading formats back from a QDQ file
(:mod:`.readback`).

May import: core, graph, quant.
"""
