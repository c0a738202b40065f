"""`speckv`: generate through a decode worker, ask and administer a predictor.

Errors a user can act on are printed to stderr in one or two lines (no traceback) and
end the process with a distinct exit code (see `ExitCode`; docs/client.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import math
import os
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

# gRPC's C core logs TLS handshake failures and bad targets straight to stderr, before
# the one-line error below says the same; it reads this when it loads, so set it first.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

from speckv.vocabulary import DEFAULT_GAMMA_CANDIDATES
from speckv_client import ab, flags
from speckv_client.channel import TlsConfig
from speckv_client.errors import (
    AdminAuthError,
    InvalidArgument,
    NotFound,
    PredictorRequestError,
    PredictorUnavailable,
    SpeckvError,
    WorkerUnavailable,
)
from speckv_client.types import (
    ArmStatsReport,
    Compression,
    DecideBatch,
    DraftSignals,
    FeatureRow,
    GenerationSummary,
    ModelInfo,
    ModelSelector,
    ModelState,
    Objective,
    RouteWeight,
    Routing,
    StepTiming,
    TokenChunk,
    Window,
)

STABLE_ARM = "stable"


class ExitCode(enum.IntEnum):
    OK = 0
    SERVER_ERROR = 1
    """The server failed in a way none of the codes below describes (INTERNAL, ...)."""
    USAGE = 2
    """Bad command line: unknown flag, malformed or out-of-range value."""
    UNREACHABLE = 3
    """No server at the address, or it did not answer within --timeout."""
    AUTH = 4
    """The admin token was missing or refused."""
    NOT_FOUND = 5
    """Unknown model, version or alias."""
    REFUSED = 6
    """The server refused the request's values (it names the field)."""
    INTERRUPTED = 130


class UsageError(Exception):
    """A flag value the CLI can reject before calling anything."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is two lines (what and where to look), like every other
    error of this CLI, instead of a usage block that can push the error off the screen."""

    def error(self, message: str) -> NoReturn:
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message}\n  see `{self.prog} --help`\n")


# --- parsing helpers (raise UsageError with the flag and the value) ---


def _floats(text: str, flag: str, n: int) -> list[float]:
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != n:
        raise UsageError(f"{flag} needs {n} comma-separated numbers, got {len(parts)}: {text!r}")
    values: list[float] = []
    for p in parts:
        try:
            v = float(p)
        except ValueError:
            raise UsageError(f"{flag}: {p!r} is not a number (in {text!r})") from None
        if not math.isfinite(v):
            raise UsageError(f"{flag}: {p!r} is not finite (in {text!r})")
        values.append(v)
    return values


def _candidates(text: str) -> tuple[int, ...]:
    out: list[int] = []
    for p in text.split(","):
        try:
            g = int(p.strip())
        except ValueError:
            raise UsageError(
                f"--candidates: {p.strip()!r} is not an integer (in {text!r}); e.g. 2,4,6,8"
            ) from None
        if not 0 <= g <= flags.UINT32_MAX:
            raise UsageError(
                f"--candidates: each gamma must be an integer in [0, {flags.UINT32_MAX}], "
                f"got {g} (in {text!r})"
            )
        out.append(g)
    return tuple(out)


def _selector(text: str) -> ModelSelector:
    """NAME, NAME:VERSION or NAME@ALIAS."""
    if "@" in text:
        name, alias = text.split("@", 1)
        if not name or not alias:
            raise UsageError(f"--model: expected NAME@ALIAS, got {text!r}")
        return ModelSelector(name=name, alias=alias)
    if ":" in text:
        name, version = text.split(":", 1)
        if not name or not version.isdigit() or not 1 <= int(version) <= flags.INT64_MAX:
            raise UsageError(
                f"--model: expected NAME:VERSION with VERSION in [1, {flags.INT64_MAX}], "
                f"got {text!r}"
            )
        return ModelSelector(name=name, version=int(version))
    if not text:
        raise UsageError("--model: empty model name")
    return ModelSelector(name=text)


def _weights(pairs: Sequence[str]) -> tuple[RouteWeight, ...]:
    weights: list[RouteWeight] = []
    for pair in pairs:
        target, sep, value = pair.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not sep or not target or not math.isfinite(weight) or weight < 0:
            raise UsageError(
                f"route: expected TARGET=WEIGHT with a weight >= 0 "
                f"(e.g. stable=90 canary=10 or 2=50), got {pair!r}"
            )
        weights.append(RouteWeight(target=target, weight=weight))
    if not weights or sum(w.weight for w in weights) <= 0:
        raise UsageError("route: give at least one TARGET=WEIGHT with a positive weight")
    return tuple(weights)


def _aliases(pairs: Sequence[str]) -> dict[str, int]:
    aliases: dict[str, int] = {}
    for pair in pairs:
        alias, sep, version = pair.partition("=")
        if (
            not sep
            or not alias
            or not version.isdigit()
            or not 1 <= int(version) <= flags.INT64_MAX
        ):
            raise UsageError(
                f"--alias: expected ALIAS=VERSION with VERSION in [1, {flags.INT64_MAX}] "
                f"(e.g. stable=1), got {pair!r}"
            )
        aliases[alias] = int(version)
    return aliases


def _positive_version(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= flags.INT64_MAX:
        raise UsageError(f"VERSION must be an integer in [1, {flags.INT64_MAX}], got {text!r}")
    return int(text)


# --- output ---


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj


def _print_json(obj: Any, out: TextIO) -> None:
    out.write(json.dumps(_jsonable(obj), sort_keys=False) + "\n")


def format_routing(r: Routing) -> str:
    weights = " ".join(f"{w.target}={w.weight:g}" for w in r.weights) or "(default)"
    parts = [weights]
    if r.aliases:
        parts.append("aliases " + " ".join(f"{a}=v{v}" for a, v in r.aliases.items()))
    if r.shadow_version:
        parts.append(f"shadow v{r.shadow_version}")
    if r.salt:
        parts.append(f"salt {r.salt!r}")
    return "; ".join(parts)


def format_summary(s: GenerationSummary) -> str:
    """The one-line summary `speckv generate` ends with."""
    line = (
        f"{s.new_tokens} tokens in {s.wall_seconds:.2f} s: {s.tokens_per_second:.1f} tokens/s, "
        f"{s.tokens_per_step:.2f} tokens/step, mean gamma {s.mean_gamma:.2f}, "
        f"acceptance {s.acceptance_rate:.2f}, decisions remote {s.remote_decisions} / "
        f"fallback {s.fallback_decisions} / local {s.local_decisions}, "
        f"finish {s.finish_reason.value}"
    )
    if s.model_versions:
        line += ", predictor " + " ".join(f"{k}x{v}" for k, v in s.model_versions.items())
    return line


def _format_model(m: ModelInfo) -> str:
    versions = ", ".join(
        f"v{v.version} {v.state.value}" + (f" [{'/'.join(v.aliases)}]" if v.aliases else "")
        for v in m.versions
    )
    default = " (default)" if m.is_default else ""
    return f"{m.name}{default}: {versions or 'no versions'}; routing {format_routing(m.routing)}"


# --- commands ---


def _tls(args: argparse.Namespace) -> TlsConfig | None:
    if not (args.tls or args.tls_ca or args.tls_server_name):
        return None
    ca = Path(args.tls_ca) if args.tls_ca else None
    if ca is not None and not ca.is_file():
        raise UsageError(f"--tls-ca: no such file {str(ca)!r}")
    return TlsConfig(ca_cert=ca, server_name=args.tls_server_name or "")


def _predictor(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from speckv_client.predictor import PredictorClient

    return PredictorClient(
        args.predictor,
        tls=_tls(args),
        admin_token=args.admin_token or None,
        timeout_s=args.timeout,
    )


def cmd_generate(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from speckv_client.decoder import DecoderClient

    with DecoderClient(
        args.worker, tls=_tls(args), timeout_s=args.timeout, generate_timeout_s=args.deadline
    ) as client:
        events = client.generate(
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            stop=args.stop or (),
            seed=args.seed,
            policy=args.policy or "",
            request_id=args.request_id or "",
        )
        summary: GenerationSummary | None = None
        try:
            for event in events:
                if args.json:
                    kind = "chunk" if isinstance(event, TokenChunk) else "summary"
                    _print_json({"event": kind, **_jsonable(event)}, out)
                    out.flush()
                elif isinstance(event, TokenChunk):
                    out.write(event.text)
                    out.flush()
                if isinstance(event, GenerationSummary):
                    summary = event
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()
        if summary is None:
            raise WorkerUnavailable(f"worker at {args.worker} ended the stream without a summary")
        if not args.json:
            out.write("\n")
            out.flush()
            err.write(format_summary(summary) + "\n")
    return ExitCode.OK


def cmd_predict(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    h, c, hmax, cmin = _floats(args.features, "--features", 4)
    timing = None
    if args.timing:
        draft, base, per_token = _floats(args.timing, "--timing", 3)
        timing = StepTiming(draft, base, per_token)
    batch = DecideBatch(
        rows=(
            FeatureRow(
                routing_key=args.routing_key,
                step=args.step,
                signals=DraftSignals(h, c, hmax, cmin),
                compression=Compression(args.compression),
            ),
        ),
        gamma_candidates=_candidates(args.candidates),
        window=Window(args.window),
        objective=Objective(args.objective) if args.objective else None,
        timing=timing,
        model=_selector(args.model) if args.model else None,
    )
    with _predictor(args) as client:
        try:
            decisions = client.decide(batch)
        except PredictorRequestError as exc:
            if exc.code == "NOT_FOUND":  # an unknown --model is the user's to fix
                raise NotFound(f"{exc.field or 'model'}: {exc.details}") from None
            if exc.field == "timing":
                raise PredictorRequestError(
                    exc.code,
                    exc.field,
                    f"{exc.details} -- pass --timing DRAFT,BASE,PER_TOKEN "
                    "or --objective tokens_per_step",
                ) from None
            raise
    if not decisions:
        raise SpeckvError(f"predictor at {args.predictor} answered with no decision")
    d = decisions[0]
    if args.json:
        _print_json(d, out)
        return ExitCode.OK
    out.write(f"gamma {d.gamma}  (model {d.model_name} v{d.model_version}, arm {d.arm})\n")
    out.write(f"{'gamma':>6} {'acceptance':>11} {'score':>10}\n")
    for cand in d.candidates:
        mark = "  <- chosen" if cand.gamma == d.gamma else ""
        out.write(f"{cand.gamma:>6} {cand.predicted_acceptance:>11.4f} {cand.score:>10.4f}{mark}\n")
    return ExitCode.OK


def cmd_models(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    with _predictor(args) as client:
        if args.models_command == "list":
            models = client.list_models()
            if args.json:
                _print_json(models, out)
            elif not models:
                out.write("no models loaded\n")
            for m in models if not args.json else ():
                out.write(_format_model(m) + "\n")
        elif args.models_command == "show":
            m = client.get_model(args.name)
            if args.json:
                _print_json(m, out)
                return ExitCode.OK
            out.write(_format_model(m) + "\n")
            for v in m.versions:
                out.write(
                    f"  v{v.version}: {v.state.value}, window {v.window}, "
                    f"features {','.join(v.feature_names)}, "
                    f"candidates {','.join(map(str, v.gamma_candidates))}"
                    + (f", aliases {','.join(v.aliases)}" if v.aliases else "")
                    + (f", error: {v.error}" if v.error else "")
                    + "\n"
                )
        elif args.models_command == "load":
            info = client.load_model(args.name, _positive_version(args.version))
            if args.json:
                _print_json(info, out)
            else:
                why = f": {info.error}" if info.error else ""
                out.write(f"{args.name} v{info.version}: {info.state.value}{why}\n")
        else:
            version = _positive_version(args.version)
            client.unload_model(args.name, version)
            if args.json:
                _print_json({"name": args.name, "version": version, "unloaded": True}, out)
            else:
                out.write(f"{args.name} v{version}: unloaded\n")
    return ExitCode.OK


def _routing_out(args: argparse.Namespace, routing: Routing, out: TextIO) -> int:
    """A routing change's answer: the model's routing as JSON or one line."""
    if args.json:
        _print_json(routing, out)
    else:
        out.write(f"{args.model}: {format_routing(routing)}\n")
    return ExitCode.OK


def cmd_route(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    weights = _weights(args.weights)
    aliases = _aliases(args.alias or [])
    with _predictor(args) as client:
        current = client.get_routing(args.model)
        merged = Routing(
            weights=weights,
            salt=current.salt if args.salt is None else args.salt,
            shadow_version=(
                0
                if args.no_shadow
                else (current.shadow_version if args.shadow is None else args.shadow)
            ),
            aliases={**current.aliases, **aliases},
        )
        routing = client.set_routing(args.model, merged)
    return _routing_out(args, routing, out)


def cmd_rollback(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    with _predictor(args) as client:
        routing = client.rollback(args.model)
    return _routing_out(args, routing, out)


def cmd_promote(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Alias stable -> VERSION, every weight on stable (the others kept at 0)."""
    version = _positive_version(args.version)
    with _predictor(args) as client:
        info = client.get_model(args.model)
        known = {v.version: v for v in info.versions}
        if version not in known:
            raise NotFound(
                f"model {args.model!r} has no version {version} "
                f"(versions: {', '.join(f'v{v}' for v in sorted(known)) or 'none'}); "
                f"load it first with `speckv models load {args.model} {version}`"
            )
        state = known[version].state
        if state is not ModelState.READY:
            why = f": {known[version].error}" if known[version].error else ""
            raise InvalidArgument(
                f"model {args.model!r} v{version} is {state.value}{why}; "
                "only a ready version can be promoted"
            )
        current = client.get_routing(args.model)
        previous = current.aliases.get(STABLE_ARM)
        others = [w.target for w in current.weights if w.target != STABLE_ARM]
        routing = client.set_routing(
            args.model,
            Routing(
                weights=(
                    RouteWeight(target=STABLE_ARM, weight=100.0),
                    *(RouteWeight(target=t, weight=0.0) for t in dict.fromkeys(others)),
                ),
                salt=current.salt,
                # A shadow of the version now serving would only score it against itself.
                shadow_version=0 if current.shadow_version == version else current.shadow_version,
                aliases={**current.aliases, STABLE_ARM: version},
            ),
        )
    if not args.json:
        was = f"v{previous}" if previous is not None else "no stable alias"
        err.write(f"promoted {args.model} v{version} to {STABLE_ARM} (was {was})\n")
    return _routing_out(args, routing, out)


def _replica_addresses(target: str) -> tuple[list[str], str | None]:
    """Every address a --predictor names: a host name resolves (getaddrinfo) to all its
    addresses, as a Kubernetes headless Service name resolves to every replica pod.

    Returns (addresses, None), or ([], why) when the name does not resolve.
    """
    for scheme in ("unix:", "unix-abstract:", "vsock:"):
        if target.startswith(scheme):
            return [target], None
    for scheme in ("ipv4:", "ipv6:"):
        if target.startswith(scheme):
            return [scheme + a for a in target[len(scheme) :].split(",") if a], None
    rest = target
    if rest.startswith("dns:"):
        rest = rest[len("dns:") :]
        if rest.startswith("//"):
            rest = rest[2:].partition("/")[2]
    host, _, port = rest.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        return [f"{host}:{port}"], None
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        return [], f"cannot resolve {host!r} ({exc})"
    addresses: list[str] = []
    for family, _, _, _, sockaddr in infos:
        ip = str(sockaddr[0])
        addresses.append(f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}")
    return list(dict.fromkeys(addresses)), None


def _host_of(target: str) -> str:
    rest = target.removeprefix("dns:")
    if rest.startswith("//"):
        rest = rest[2:].partition("/")[2]
    return rest.rpartition(":")[0].strip("[]")


def cmd_ab(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from speckv_client.predictor import PredictorClient

    tls = _tls(args)
    dials: dict[str, str] = {}  # address -> the --predictor it came from
    failed: list[tuple[str, str, str]] = []  # (address, from, why)
    for target in dict.fromkeys(args.predictor):
        addresses, why = _replica_addresses(target)
        if why is not None:
            failed.append((target, target, why))
        for a in addresses:
            dials.setdefault(a, target)
    tried = len(dials) + len(failed)  # every address, and every name that did not resolve
    reports: list[ArmStatsReport] = []
    answered: list[str] = []

    def client_for(address: str) -> PredictorClient:
        # A resolved IP still presents the certificate of the name it was resolved from.
        dial_tls = tls
        if tls is not None and not tls.server_name and address != dials[address]:
            dial_tls = dataclasses.replace(tls, server_name=_host_of(dials[address]))
        return PredictorClient(address, tls=dial_tls, timeout_s=args.timeout)

    for address, origin in dials.items():
        try:
            with client_for(address) as client:
                report = client.arm_stats(
                    model_name=args.model,
                    window_seconds=args.window_seconds,
                    include_sequences=True,
                )
        except PredictorUnavailable as exc:
            failed.append((address, origin, exc.details or str(exc)))
            continue
        if not report.replica:
            report = dataclasses.replace(report, replica=f"{address} (no replica id)")
        reports.append(report)
        answered.append(address)
    if failed and (not args.allow_partial or not reports):
        listing = "; ".join(f"{a}{f' (from {o})' if o != a else ''}: {why}" for a, o, why in failed)
        if not reports:
            raise PredictorUnavailable(f"no predictor answered: {listing}")
        raise PredictorUnavailable(
            f"{len(failed)} of {tried} predictor address(es) did not answer, so the "
            f"{len(reports)} that did are not the whole: {listing}; pass --allow-partial "
            "to sum only those (the output says it is partial)"
        )
    merged = ab.merge_reports(reports)
    if not merged.arms:
        # No outcomes at all: make sure the model exists (exit 5 when it does not).
        with client_for(answered[0]) as client:
            client.get_model(args.model)
    result = ab.analyze(
        args.model, merged, baseline=args.baseline, seed=args.seed, resamples=args.resamples
    )
    replicas: dict[str, object] = {
        "summed": len(merged.replicas),
        "identities": list(merged.replicas),
        "addresses": answered,
        "duplicates": list(merged.duplicates),
        "failed": [{"address": a, "from": o, "error": why} for a, o, why in failed],
        "partial": bool(failed),
        "window_seconds": args.window_seconds,
        "fallback_steps": merged.fallback_steps,
        "local_steps": merged.local_steps,
        "rejected_outcomes": merged.rejected_outcomes,
    }
    partial = ""
    if failed:
        partial = (
            f"PARTIAL: {len(failed)} address(es) did not answer and are not counted: "
            + "; ".join(f"{a}: {why}" for a, _, why in failed)
        )
        err.write(f"speckv: warning: {partial}\n")
    if args.json:
        _print_json(ab.result_to_json(result, replicas), out)
        return ExitCode.OK
    window = f"the last {args.window_seconds:g} s" if args.window_seconds > 0 else "since reset"
    summed = (
        f"summed {len(merged.replicas)} replica(s) ({', '.join(merged.replicas)}) "
        f"over {len(answered)} address(es)"
    )
    if merged.duplicates:
        summed += f"; {', '.join(merged.duplicates)} answered more than once, counted once"
    out.write(f"{args.model}: {summed}; outcomes {window}\n")
    if partial:
        out.write(partial + "\n")
    if result.arms:
        out.write("\n".join(ab.format_table(result)) + "\n")
    uncredited = merged.fallback_steps + merged.local_steps
    if uncredited or merged.rejected_outcomes:
        out.write(
            f"not credited to any arm: {merged.fallback_steps} fallback and "
            f"{merged.local_steps} local step(s); {merged.rejected_outcomes} outcome(s) "
            "rejected\n"
        )
    if result.baseline is not None and result.comparisons:
        for c in result.comparisons:
            if c.relative_difference is None or c.ci is None:
                continue
            step = ""
            if c.tokens_per_step_difference is not None and c.tokens_per_step_ci is not None:
                step = (
                    f"; tokens/step {100 * c.tokens_per_step_difference:+.1f} % "
                    f"(95 % CI {100 * c.tokens_per_step_ci.low:+.1f} % to "
                    f"{100 * c.tokens_per_step_ci.high:+.1f} %)"
                )
            out.write(
                f"{c.candidate.label} vs {c.baseline.label}: tokens/s "
                f"{100 * c.relative_difference:+.1f} % (95 % CI {100 * c.ci.low:+.1f} % to "
                f"{100 * c.ci.high:+.1f} %){step}\n"
            )
    out.write(f"verdict: {result.verdict}\n")
    return ExitCode.OK


# --- parser ---


def _global_flags(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """Global flags, accepted before and after the subcommand."""

    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--admin-token",
        default=default(os.environ.get("SPECKV_ADMIN_TOKEN", "")),
        help="token for admin calls (default: $SPECKV_ADMIN_TOKEN)",
    )
    parser.add_argument(
        "--tls", action="store_true", default=default(False), help="use TLS (system CA roots)"
    )
    parser.add_argument("--tls-ca", default=default(""), help="PEM CA file; implies --tls")
    parser.add_argument(
        "--tls-server-name", default=default(""), help="name to check in the server certificate"
    )
    parser.add_argument(
        "--timeout",
        type=flags.float_range(0.0, flags.MAX_SECONDS, lo_open=True),
        default=default(5.0),
        help="seconds per call, retries included (default 5; at most 86400)",
    )


def _predictor_command(
    sub: Any, name: str, help_text: str, common: argparse.ArgumentParser, *positionals: str
) -> argparse.ArgumentParser:
    """A subcommand that talks to one predictor: its positionals and `--predictor`."""
    p: argparse.ArgumentParser = sub.add_parser(name, parents=[common], help=help_text)
    for positional in positionals:
        p.add_argument(positional)
    p.add_argument("--predictor", required=True, metavar="HOST:PORT", type=flags.target())
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="speckv", description="Talk to SpecKV decode workers and predictors.")
    _global_flags(parser, suppress=False)
    common = _Parser(add_help=False)
    _global_flags(common, suppress=True)
    common.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", parents=[common], help="generate text through a worker")
    gen.add_argument("prompt")
    gen.add_argument("--worker", required=True, metavar="HOST:PORT", type=flags.target())
    gen.add_argument(
        "--max-new-tokens",
        type=flags.int_range(0, flags.UINT32_MAX),
        default=0,
        help="0: the worker's default",
    )
    gen.add_argument(
        "--temperature", type=flags.float_range(0.0, None), default=0.0, help="0 is greedy"
    )
    gen.add_argument("--top-p", type=flags.float_range(0.0, 1.0), default=0.0, help="0 or 1: off")
    gen.add_argument(
        "--seed",
        type=flags.int_range(0, flags.UINT64_MAX),
        default=0,
        help="sampling seed; 0: unseeded",
    )
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--policy", help="remote | fixed:N | heuristic (default: the worker's)")
    gen.add_argument("--request-id", help="sticky routing key (default: random)")
    gen.add_argument(
        "--deadline",
        type=flags.float_range(0.0, flags.MAX_SECONDS, lo_open=True),
        default=600.0,
        help="seconds for the whole generation (default 600; at most 86400)",
    )
    gen.set_defaults(run=cmd_generate)

    pred = _predictor_command(sub, "predict", "ask a predictor for one gamma decision", common)
    pred.add_argument(
        "--features",
        required=True,
        metavar="H,C,HMAX,CMIN",
        help="mean entropy (bits), mean confidence, max entropy, min confidence",
    )
    pred.add_argument("--compression", required=True, choices=[c.value for c in Compression])
    pred.add_argument(
        "--candidates", default=",".join(map(str, DEFAULT_GAMMA_CANDIDATES)), metavar="G,G,..."
    )
    pred.add_argument("--objective", choices=[o.value for o in Objective])
    pred.add_argument(
        "--timing",
        metavar="DRAFT,BASE,PER_TOKEN",
        help="seconds: draft per token, verify base, verify per token (for goodput)",
    )
    pred.add_argument(
        "--window", choices=[w.value for w in Window], default=Window.PREVIOUS_STEP.value
    )
    pred.add_argument("--model", metavar="NAME[:VERSION|@ALIAS]")
    pred.add_argument("--routing-key", default="speckv-cli")
    pred.add_argument("--step", type=flags.int_range(0, flags.UINT64_MAX), default=1)
    pred.set_defaults(run=cmd_predict)

    models = sub.add_parser("models", help="list, show, load and unload predictor models")
    msub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    for action, help_text in (
        ("list", "every model, its versions and routing"),
        ("show", "one model in detail"),
        ("load", "load a version (admin)"),
        ("unload", "unload a version (admin)"),
    ):
        positionals = {"list": (), "show": ("name",)}.get(action, ("name", "version"))
        _predictor_command(msub, action, help_text, common, *positionals)
    models.set_defaults(run=cmd_models)

    route = _predictor_command(
        sub,
        "route",
        "set a model's routing (admin); unspecified salt/shadow/aliases are kept",
        common,
        "model",
    )
    route.add_argument("weights", nargs="+", metavar="TARGET=WEIGHT")
    route.add_argument(
        "--shadow",
        type=flags.int_range(0, flags.INT64_MAX),
        help="version scored in the shadow (0: none)",
    )
    route.add_argument("--no-shadow", action="store_true", help="clear the shadow version")
    route.add_argument("--salt")
    route.add_argument("--alias", action="append", metavar="ALIAS=VERSION")
    route.set_defaults(run=cmd_route)

    rollback = _predictor_command(
        sub,
        "rollback",
        "route 100%% to the `stable` alias and clear the shadow (admin)",
        common,
        "model",
    )
    rollback.set_defaults(run=cmd_rollback)

    promote = _predictor_command(
        sub,
        "promote",
        "point the `stable` alias at VERSION and put every weight on it (admin)",
        common,
        "model",
        "version",
    )
    promote.set_defaults(run=cmd_promote)

    abp = sub.add_parser(
        "ab",
        parents=[common],
        help="compare a model's arms: tokens/s with 95%% intervals over sequences, a verdict",
    )
    abp.add_argument("model")
    abp.add_argument(
        "--predictor",
        required=True,
        action="append",
        metavar="HOST:PORT",
        type=flags.target(),
        help="repeatable; a name is resolved to ALL its addresses (a headless Service: "
        "every replica), and every one is asked and summed",
    )
    abp.add_argument(
        "--window-seconds",
        type=flags.float_range(0.0, None),
        default=0.0,
        help="only sequences with an outcome in the last S seconds (default 0: since reset)",
    )
    abp.add_argument(
        "--baseline",
        metavar="ARM",
        help="the arm (or vN) the others are compared with (default: stable, else the arm "
        "with the most sequences)",
    )
    abp.add_argument(
        "--seed",
        type=flags.int_range(0, flags.UINT64_MAX),
        default=ab.DEFAULT_SEED,
        help=f"bootstrap seed (default {ab.DEFAULT_SEED}); the same seed, the same numbers",
    )
    abp.add_argument(
        "--resamples",
        type=flags.int_range(100, 100_000),
        default=ab.DEFAULT_RESAMPLES,
        help=f"bootstrap resamples (default {ab.DEFAULT_RESAMPLES})",
    )
    abp.add_argument(
        "--allow-partial",
        action="store_true",
        help="when some addresses do not answer, sum the others and say it is partial "
        "(default: exit 3)",
    )
    abp.set_defaults(run=cmd_ab)
    return parser


_EXIT_FOR: tuple[tuple[type[BaseException], ExitCode, str], ...] = (
    (UsageError, ExitCode.USAGE, "see `speckv COMMAND --help`"),
    (PredictorUnavailable, ExitCode.UNREACHABLE, ""),
    (WorkerUnavailable, ExitCode.UNREACHABLE, ""),
    (AdminAuthError, ExitCode.AUTH, ""),
    (NotFound, ExitCode.NOT_FOUND, "list what is loaded with `speckv models list`"),
    (PredictorRequestError, ExitCode.REFUSED, ""),
    (InvalidArgument, ExitCode.REFUSED, ""),
    (SpeckvError, ExitCode.SERVER_ERROR, ""),
    (ValueError, ExitCode.USAGE, ""),
)


def _tls_handshake_failed(args: argparse.Namespace, exc: BaseException) -> bool:
    tls = getattr(args, "tls", False) or getattr(args, "tls_ca", "")
    return bool(tls) and "handshake" in str(exc).lower()


def main(
    argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace, TextIO, TextIO], int] = args.run
    try:
        return int(run(args, out, err))
    except KeyboardInterrupt:
        err.write("\nspeckv: interrupted\n")
        return ExitCode.INTERRUPTED
    except BrokenPipeError:
        return ExitCode.OK
    except Exception as exc:
        for cls, code, hint in _EXIT_FOR:
            if isinstance(exc, cls):
                err.write(f"speckv: error: {exc}\n")
                if not hint and _tls_handshake_failed(args, exc):
                    hint = "does the server use TLS? without it, drop --tls/--tls-ca"
                if hint:
                    err.write(f"  {hint}\n")
                return int(code)
        raise


if __name__ == "__main__":
    sys.exit(main())
