"""pipedec-sim: PipeDec (pipelined dynamic-tree speculative decoding), simulated and real.

The core (this package) is importable without torch: the prediction tree, expansion
policies, sans-IO strategies, per-stage KV bookkeeping, calibration profiles and traces.
"""
__version__ = "0.1.0"
