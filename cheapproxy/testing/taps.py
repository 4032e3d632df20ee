"""What the same-protocol relay sends for a tap, without the network: for a
protocol plugin's tests of its ``Passthrough``."""

from __future__ import annotations

from collections.abc import Iterable

from cheapproxy.protocol import Passthrough


def relayed(tap: Passthrough, reads: Iterable[bytes]) -> bytes:
    """The bytes ``cheapproxy.relay`` sends the client for these upstream
    reads: each read goes through ``tap.feed`` until the tap has seen the
    protocol's terminal event (``tap.ended``: nothing more is read); at the
    end of the body, ``tap.close()`` adds what it holds back."""
    out: list[bytes] = []
    for chunk in reads:
        out.append(tap.feed(chunk))
        if tap.ended:
            return b"".join(out)
    out.append(tap.close())
    return b"".join(out)
