"""speckv_client: typed Python clients for the SpecKV predictor and decoder services."""

__version__ = "0.1.0"
