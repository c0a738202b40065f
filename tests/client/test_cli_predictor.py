"""`speckv` as a subprocess against the real predictor server, error cases included."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from speckv_client.cli import ExitCode

from tests.client.servers import ADMIN_TOKEN, RunningPredictor

MODEL = "speckv-mlp16"


def speckv(*args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SPECKV_ADMIN_TOKEN"}
    if token is not None:
        env["SPECKV_ADMIN_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "speckv_client.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def assert_user_error(proc: subprocess.CompletedProcess[str], code: ExitCode, needle: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert needle in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert 1 <= len(proc.stderr.strip().splitlines()) <= 2, proc.stderr


def test_models_list_show_and_unknown_model(predictor: RunningPredictor) -> None:
    p = ("--predictor", predictor.address)
    out = speckv("models", "list", *p)
    assert out.returncode == 0, out.stderr
    assert f"{MODEL}: v1 ready, v2 ready" in out.stdout
    listed = json.loads(speckv("models", "list", *p, "--json").stdout)
    assert {m["name"] for m in listed} == {MODEL, "speckv-mlp16-same-step"}
    show = speckv("models", "show", MODEL, *p)
    assert "v1: ready, window previous_step" in show.stdout
    assert_user_error(
        speckv("models", "show", "no-such-model", *p), ExitCode.NOT_FOUND, "no-such-model"
    )


def test_admin_token_refused_then_accepted(predictor: RunningPredictor) -> None:
    p = ("--predictor", predictor.address)
    assert_user_error(speckv("models", "unload", MODEL, "2", *p), ExitCode.AUTH, "--admin-token")
    assert_user_error(
        speckv("models", "unload", MODEL, "2", *p, "--admin-token", "nope"),
        ExitCode.AUTH,
        "refused",
    )
    ok = speckv("models", "unload", MODEL, "2", *p, token=ADMIN_TOKEN)
    assert ok.returncode == 0 and f"{MODEL} v2: unloaded" in ok.stdout, ok.stderr
    loaded = speckv("--admin-token", ADMIN_TOKEN, "models", "load", MODEL, "2", *p)
    assert loaded.returncode == 0 and f"{MODEL} v2: ready" in loaded.stdout, loaded.stderr
    assert_user_error(
        speckv("models", "load", MODEL, "77", *p, token=ADMIN_TOKEN), ExitCode.NOT_FOUND, "77"
    )


def test_route_and_rollback(predictor: RunningPredictor) -> None:
    p = ("--predictor", predictor.address)
    assert_user_error(
        speckv("rollback", MODEL, *p, token=ADMIN_TOKEN), ExitCode.REFUSED, "no 'stable' alias"
    )
    routed = speckv(
        "route",
        MODEL,
        "stable=90",
        "canary=10",
        "--alias",
        "stable=1",
        "--alias",
        "canary=2",
        "--shadow",
        "2",
        "--salt",
        "s1",
        "--json",
        *p,
        token=ADMIN_TOKEN,
    )
    assert routed.returncode == 0, routed.stderr
    r = json.loads(routed.stdout)
    assert r["weights"] == [
        {"target": "stable", "weight": 90.0},
        {"target": "canary", "weight": 10.0},
    ]
    assert (r["aliases"], r["shadow_version"], r["salt"]) == ({"canary": 2, "stable": 1}, 2, "s1")
    # Only the weights given: salt, shadow and aliases are kept.
    again = speckv("route", MODEL, "stable=50", "canary=50", *p, token=ADMIN_TOKEN)
    assert "stable=50 canary=50; aliases canary=v2 stable=v1; shadow v2; salt 's1'" in again.stdout
    back = speckv("rollback", MODEL, *p, token=ADMIN_TOKEN)
    assert back.returncode == 0, back.stderr
    assert back.stdout.strip() == f"{MODEL}: stable=100; aliases canary=v2 stable=v1; salt 's1'"
    bad_alias = speckv("route", MODEL, "stable=100", "--alias", "stable=9", *p, token=ADMIN_TOKEN)
    assert bad_alias.returncode in (ExitCode.REFUSED, ExitCode.NOT_FOUND), bad_alias.stderr
    assert "9" in bad_alias.stderr and "Traceback" not in bad_alias.stderr
    assert_user_error(
        speckv("rollback", "no-such-model", *p, token=ADMIN_TOKEN),
        ExitCode.NOT_FOUND,
        "no-such-model",
    )


def test_predict_one_row(predictor: RunningPredictor) -> None:
    p = ("--predictor", predictor.address)
    common = ("--features", "1.2,0.7,2.5,0.3", "--compression", "nf4", "--model", MODEL)
    out = speckv("predict", *common, "--objective", "tokens_per_step", "--json", *p)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["model_name"] == MODEL and d["model_version"] in (1, 2)
    assert [c["gamma"] for c in d["candidates"]] == [2, 4, 6, 8]
    assert d["gamma"] == max(d["candidates"], key=lambda c: c["score"])["gamma"]
    text = speckv(
        "predict",
        *common,
        "--objective",
        "goodput",
        "--timing",
        "0.001,0.005,0.0004",
        "--candidates",
        "0,2,4",
        "--model",
        f"{MODEL}:1",
        *p,
    )
    assert text.returncode == 0, text.stderr
    assert f"(model {MODEL} v1, arm pinned)" in text.stdout
    assert "<- chosen" in text.stdout
    assert_user_error(
        speckv("predict", *common, "--objective", "goodput", *p), ExitCode.REFUSED, "timing"
    )
    assert_user_error(
        speckv("predict", *common, "--candidates", "4,4", *p), ExitCode.REFUSED, "gamma_candidates"
    )
    assert_user_error(
        speckv(
            "predict",
            "--features",
            "1,0.5,2,0.2",
            "--compression",
            "fp16",
            "--model",
            "no-such-model",
            *p,
        ),
        ExitCode.NOT_FOUND,
        "no-such-model",
    )
