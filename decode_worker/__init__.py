"""SpecKV decode worker: speculative decoding on a draft/target pair, gamma chosen per step."""

__version__ = "0.1.0"
