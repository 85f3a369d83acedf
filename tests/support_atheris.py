"""Coverage-guided fuzz targets (atheris / libFuzzer), run as a subprocess by
tests/test_fuzz_wire.py with a fixed seed and a bounded number of runs:

    python tests/support_atheris.py wire -runs=20000 -seed=1 -max_len=4096
    python tests/support_atheris.py request -runs=20000 -seed=1

``wire``: the client's reply decoder — any bytes decode to a reply no longer
than the input, or raise ``EntropyReplyError`` ("malformed reply: ...").
``request``: request validation — the bytes choose a ``vllm_xargs`` mapping
(known, mis-cased, unknown and infrastructure keys; integers, floats with NaN
and infinities, booleans, strings, None, lists); the result is valid options
or a ``ConfigError`` naming a key that was sent.
Anything else (another exception, an assertion) is a crash: libFuzzer prints
the input and exits non-zero.
"""

from __future__ import annotations

import sys
from typing import Any

import atheris

with atheris.instrument_imports():
    from qr_sampler.config import SamplingConfig, parse_request_options
    from qr_sampler.entropy.wire import decode_response
    from qr_sampler.errors import ConfigError, EntropyReplyError

DEFAULTS = SamplingConfig()


def wire(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    extended = fdp.ConsumeBool()
    buf = fdp.ConsumeBytes(fdp.remaining_bytes())
    try:
        reply = decode_response(buf, extended=extended)
    except EntropyReplyError as exc:
        assert str(exc).startswith("malformed reply: "), exc
        return
    assert len(reply.data) <= len(buf)


KEYS = sorted(
    ["qr_bypass", "QR_TOP_K", "qr_", "qr_grpc_api_key", "other_plugin"]
    + ["qr_" + name for name in SamplingConfig.model_fields]
)


def _value(fdp: Any, depth: int = 0) -> Any:
    kind = fdp.ConsumeIntInRange(0, 6 if depth == 0 else 5)
    if kind == 0:
        return fdp.ConsumeInt(fdp.ConsumeIntInRange(1, 10))
    if kind == 1:
        return fdp.ConsumeFloat()  # includes NaN, infinities, subnormals
    if kind == 2:
        return fdp.ConsumeBool()
    if kind == 3:
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 24))
    if kind == 4:
        return fdp.PickValueInList(["fixed", "edt", "zscore_mean", "full", "none", "true", ""])
    if kind == 5:
        return None
    return [_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))]


def request(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    xargs: dict[str, Any] = {}
    for _ in range(fdp.ConsumeIntInRange(0, 5)):
        if fdp.ConsumeBool():
            key = fdp.PickValueInList(KEYS)
        else:
            key = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 12))
        xargs[key] = _value(fdp)
    try:
        parse_request_options(xargs, DEFAULTS)
    except ConfigError as exc:
        sent = [k for k in xargs if k.lower().startswith("qr_")]
        assert any(k in str(exc) for k in sent), (xargs, str(exc))


if __name__ == "__main__":
    target = {"wire": wire, "request": request}[sys.argv.pop(1)]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()
