"""SpecKV predictor service: gamma decisions from versioned ONNX models over gRPC.

The serving path imports onnxruntime and numpy only (never torch); training code
(scikit-learn, skl2onnx) is imported lazily by `speckv-predictor train`.
"""

__version__ = "0.1.0"
