"""speckv_tinypair: build the project's tiny draft/target pair (`speckv-tiny-pair`).

Tests, the demo and the dev-cpu image serve a pair the project trains itself on CPU, so
nothing downloads weights (docs/tiny-pair.md). This package is the builder only — corpus,
training, measurement and its command line — installed with the `tinypair` extra and kept out
of the worker image; the worker serves the folder it writes. What a finished folder says about
itself (`tiny-pair.json`) is read by `decode_worker.pair_manifest`, so readers need no builder.
"""
