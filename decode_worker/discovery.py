"""Learn the remote policy's window and objective from the model the predictor serves.

`speckv-worker serve --predictor ADDR --policy remote` with no `--window` asks the
predictor for its model (GetModel; the default model, or `--predictor-model`) and uses the
window its READY versions declare in their manifests (docs/design.md, "Decision windows"),
so a draft_plan model runs as a draft plan with no other flag. A `--window` given on the
command line must agree with the model; a disagreement, a model whose versions declare
different windows, or features this worker cannot compute are refused with a message that
says what to change — never served silently on the wrong window.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from speckv.vocabulary import FEATURES_ALLOWED_BY_WINDOW, WORKER_REQUEST_WINDOW
from speckv_client.types import ModelInfo, ModelState, Window

from decode_worker.config import ConfigError, RemotePolicyConfig


def model_window(info: ModelInfo) -> str:
    """The one window the model's READY versions declare; ConfigError otherwise."""
    windows = {v.window for v in info.versions if v.state == ModelState.READY}
    if not windows:
        raise ConfigError(
            f"predictor model {info.name!r} has no READY version; cannot learn its window"
        )
    if len(windows) > 1:
        raise ConfigError(
            f"predictor model {info.name!r} has READY versions with different windows "
            f"{sorted(windows)}; serve one window per model name"
        )
    window = windows.pop()
    for v in info.versions:
        if v.state != ModelState.READY:
            continue
        missing = set(v.feature_names) - FEATURES_ALLOWED_BY_WINDOW.get(window, frozenset())
        if missing:
            raise ConfigError(
                f"predictor model {info.name!r} v{v.version} needs features this worker "
                f"cannot compute: {sorted(missing)}"
            )
    return window


def resolve_remote(
    remote: RemotePolicyConfig,
    explicit_window: Window | None,
    client: Any,
    model_name: str,
    wait_s: float = 10.0,
) -> tuple[RemotePolicyConfig, str]:
    """(config with the model's window, a one-line description for the log)."""
    deadline = time.monotonic() + wait_s
    last: Exception | None = None
    info: ModelInfo | None = None
    while info is None:
        try:
            info = client.get_model(model_name)
        except Exception as err:  # unreachable or not ready yet: retry until the deadline
            last = err
            if time.monotonic() >= deadline:
                break
            time.sleep(0.5)
    if info is None:
        if explicit_window is not None:
            return replace(remote, window=explicit_window), (
                f"predictor not reachable ({last}); using --window {explicit_window.value}"
            )
        raise ConfigError(
            f"cannot learn the predictor model's window from {getattr(client, 'target', '?')}: "
            f"{last}; start the predictor first or pass --window"
        )
    window = model_window(info)
    request_window = WORKER_REQUEST_WINDOW.get(window)
    if request_window is None:
        raise ConfigError(f"predictor model {info.name!r} has unknown window {window!r}")
    wanted = Window(request_window)
    if explicit_window is not None and explicit_window != wanted:
        # prefix is the one request window a same_step model serves.
        raise ConfigError(
            f"--window {explicit_window.value} does not match predictor model {info.name!r}, "
            f"a {window} model (it serves --window {wanted.value}); drop --window or pin "
            "another model with --predictor-model"
        )
    return replace(remote, window=wanted), f"predictor model {info.name!r}: {window} window"
