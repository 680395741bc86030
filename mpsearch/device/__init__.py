"""Running on the target: compiling on Qualcomm's HTP through ONNX Runtime's QNN execution
provider (:mod:`.qnn`), verifying that the exact bytes shipped compile and agree with the CPU
EP (:mod:`.verify`), finding the first tensor the device computes differently when they do not
agree (:mod:`.localize`), and timing every layer in every candidate on ONNX Runtime for a measured
latency table (:mod:`.latency`, :mod:`.timing`).

May import: core, data, graph, quant, hw, export.
"""
