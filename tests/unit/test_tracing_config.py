"""Tracing without sockets: W3C trace-context parsing, the `tracing` config, the optional extra."""

from __future__ import annotations

import logging
import random
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from bastion.cli import cli
from bastion.config.build import check_config
from bastion.config.loader import load_config_text
from bastion.errors import ConfigError
from bastion.observability.tracecontext import (
    TraceParent,
    bounded_tracestate,
    format_traceparent,
    incoming_context,
    parse_traceparent,
)
from bastion.observability.tracing import OncePerInterval, Tracer, traces_url

TID = "4bf92f3577b34da6a3ce929d0e0e4736"
PID = "00f067aa0ba902b7"


# --- traceparent / tracestate ------------------------------------------------------------------


def test_a_valid_traceparent_is_read() -> None:
    parent = parse_traceparent(f"00-{TID}-{PID}-01".encode())
    assert parent == TraceParent(int(TID, 16), int(PID, 16), 1)
    assert parent is not None and parent.sampled
    unsampled = parse_traceparent(f"00-{TID}-{PID}-00".encode())
    assert unsampled is not None and not unsampled.sampled


@pytest.mark.parametrize(
    "value",
    [
        f"00-{'0' * 32}-{PID}-01",
        f"00-{TID}-{'0' * 16}-01",
        f"ff-{TID}-{PID}-01",
        f"00-{TID.upper()}-{PID}-01",
        f"00-{TID}-{PID}-01-",
        f"00-{TID}-{PID}-0",
        f"00-{TID[:-1]}-{PID}-01",
        f"01-{TID}-{PID}-01x",  # a later version: more must start with '-'
        f"0-{TID}-{PID}-01",
        f"00_{TID}_{PID}_01",
        "",
    ],
)
def test_an_invalid_traceparent_is_refused(value: str) -> None:
    assert parse_traceparent(value.encode()) is None


def test_a_later_version_is_read_by_its_first_55_characters() -> None:
    assert parse_traceparent(f"cc-{TID}-{PID}-01".encode()) == TraceParent(int(TID, 16), int(PID, 16), 1)
    assert parse_traceparent(f"cc-{TID}-{PID}-09-what-comes-next".encode()) == TraceParent(
        int(TID, 16), int(PID, 16), 9
    )


def test_format_traceparent_pads_every_field() -> None:
    assert format_traceparent(1, 2, 1) == b"00-" + b"0" * 31 + b"1-" + b"0" * 15 + b"2-01"


def test_tracestate_fields_are_joined_and_kept_as_written() -> None:
    assert bounded_tracestate([b"a=1", b"b=2 ,c=3"]) == b"a=1,b=2 ,c=3"
    assert bounded_tracestate([b""]) is None


def test_a_long_tracestate_loses_whole_members_from_the_end() -> None:
    members = [f"k{i}={'v' * 40}".encode() for i in range(20)]  # 20 x 44 characters
    kept = bounded_tracestate([b",".join(members)])
    assert kept is not None and len(kept) <= 512
    assert kept.split(b",") == members[: len(kept.split(b","))]
    assert len(kept.split(b",")) == 11  # 11 x 44 + 10 commas = 494; one more would pass 512
    many = bounded_tracestate([b",".join(f"k{i}=1".encode() for i in range(40))])
    assert many is not None and len(many.split(b",")) == 32


def test_incoming_context_needs_exactly_one_valid_traceparent() -> None:
    good = (b"traceparent", f"00-{TID}-{PID}-01".encode())
    parent, state, present = incoming_context([good, (b"tracestate", b"a=1"), (b"tracestate", b"b=2")])
    assert parent is not None and state == b"a=1,b=2" and present
    assert incoming_context([good, good]) == (None, None, True)
    assert incoming_context([(b"tracestate", b"a=1")]) == (None, None, True)
    assert incoming_context([(b"host", b"a")]) == (None, None, False)


# --- the config --------------------------------------------------------------------------------

BASE = """\
version: 1
listeners:
  - name: web
    bind: "127.0.0.1:8080"
upstreams:
  app:
    targets: [{ address: "127.0.0.1:9001" }]
routes:
  - { name: all, upstream: app }
tracing:
"""


def problems(tracing: str) -> list[str]:
    text = BASE + textwrap.indent(textwrap.dedent(tracing), "  ")
    with pytest.raises(ConfigError) as info:
        check_config(load_config_text(text, "gw.yaml", env={}))
    return info.value.problems


def test_defaults() -> None:
    loaded = load_config_text(BASE + "  sample_ratio: 0.1\n", "gw.yaml", env={})
    check_config(loaded)
    tracing = loaded.config.tracing
    assert tracing is not None
    assert tracing.otlp_endpoint == "http://127.0.0.1:4318"
    assert (tracing.sample_ratio, tracing.parent_based, tracing.service_name) == (0.1, True, "bastion")
    assert (tracing.timeout, tracing.batch_delay, tracing.batch_size, tracing.queue_size) == (10.0, 5.0, 512, 2048)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ("otlp_endpoint: 127.0.0.1:4318", "gw.yaml:11: tracing.otlp_endpoint: not an http:// or https:// URL"),
        ("otlp_endpoint: ftp://collector", "gw.yaml:11: tracing.otlp_endpoint: not an http:// or https:// URL"),
        ("sample_ratio: 1.5", "gw.yaml:11: tracing.sample_ratio: Input should be less than or equal to 1 (got 1.5)"),
        ("headers: { 'bad name': x }", "gw.yaml:11: tracing.headers: not a header name: 'bad name'"),
        ("compression: zstd", "gw.yaml:11: tracing.compression: Input should be 'none' or 'gzip' (got 'zstd')"),
        ("{ batch_size: 100, queue_size: 10 }", "queue_size must be at least batch_size"),
        ("sampel_ratio: 0.5", "gw.yaml:11: tracing.sampel_ratio: unknown key (did you mean 'sample_ratio'?)"),
    ],
)
def test_bad_settings_are_reported_with_their_key_path(settings: str, expected: str) -> None:
    found = problems(settings)
    assert len(found) == 1 and expected in found[0], found


def test_exporter_url() -> None:
    assert traces_url("http://127.0.0.1:4318") == "http://127.0.0.1:4318/v1/traces"
    assert traces_url("http://127.0.0.1:4318/") == "http://127.0.0.1:4318/v1/traces"
    assert traces_url("https://otel.example.com/custom/traces") == "https://otel.example.com/custom/traces"


def test_check_summary_mentions_tracing(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(BASE + "  sample_ratio: 0.25\n")
    result = CliRunner().invoke(cli, ["check", str(path)])
    assert result.exit_code == 0, result.output
    assert "  tracing: OTLP to http://127.0.0.1:4318, sample ratio 0.25" in result.stdout


def test_without_the_otel_extra_tracing_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As if OpenTelemetry were not installed: importing it fails, and so does the tracing module.
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    monkeypatch.delitem(sys.modules, "bastion.observability.tracing", raising=False)
    path = tmp_path / "gw.yaml"
    path.write_text(BASE + "  sample_ratio: 0.25\n")
    result = CliRunner().invoke(cli, ["check", str(path)])
    assert result.exit_code == 1
    assert result.stderr.splitlines()[0] == (
        f"{path}:10: tracing: needs OpenTelemetry (opentelemetry.sdk.trace is missing): "
        "pip install 'bastion-gateway[otel]'"
    )
    # Without `tracing`, nothing needs it.
    path.write_text(BASE.replace("tracing:\n", ""))
    assert CliRunner().invoke(cli, ["check", str(path)]).exit_code == 0


def test_repeated_sdk_warnings_are_let_through_once_per_interval() -> None:
    now = [100.0]
    throttle = OncePerInterval(10.0, clock=lambda: now[0])

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("sdk", logging.WARNING, __file__, 1, msg, None, None)

    assert throttle.filter(record("Queue full, dropping %s."))
    assert not throttle.filter(record("Queue full, dropping %s."))
    assert throttle.filter(record("another message"))
    now[0] += 10.0
    assert throttle.filter(record("Queue full, dropping %s."))


@pytest.mark.parametrize("parent_based", [True, False])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5, 1.0])
def test_the_early_sampling_decision_is_the_sdks(ratio: float, parent_based: bool) -> None:
    """`Tracer.begin` decides before calling the SDK; the SDK's sampler must agree every time."""
    from opentelemetry import trace as trace_api
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    tracer = Tracer(endpoint="http://127.0.0.1:4318", sample_ratio=ratio, parent_based=parent_based)
    rng = random.Random(7)
    for _ in range(500):
        trace_id = rng.getrandbits(128) or 1
        flags = rng.choice([0, 1, 2, 3])
        parent = TraceParent(trace_id, rng.getrandbits(64) or 1, flags) if rng.random() < 0.5 else None
        context = None
        if parent is not None:
            remote = SpanContext(trace_id, parent.span_id, is_remote=True, trace_flags=TraceFlags(flags))
            context = trace_api.set_span_in_context(NonRecordingSpan(remote))
        sdk = tracer.sampler.should_sample(context, trace_id, "GET").decision.is_sampled()
        assert tracer.sampled(parent, trace_id) == sdk


def test_a_started_tracer_throttles_the_sdks_batch_warnings() -> None:
    import asyncio

    tracer = Tracer(endpoint="http://127.0.0.1:9", timeout=1.0)
    tracer.start()
    try:
        assert any(
            isinstance(f, OncePerInterval) for f in logging.getLogger("opentelemetry.sdk._shared_internal").filters
        )
    finally:
        asyncio.run(tracer.close())
    assert tracer.provider is None
