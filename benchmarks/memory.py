"""Peak memory of producing and consuming one big offloaded payload, vs a 1 KB one.

Each phase runs in its own process. Linux's high-water mark (VmHWM) is reset right before
the phase (``/proc/self/clear_refs``), so what is measured is the phase alone:

* produce: the value already exists (the task returned it); measured is what encoding,
  encrypting and streaming it to object storage plus the ledger insert add on top;
* consume: from nothing to the value in hand (claim, read, verify, decrypt, parse), so the
  value itself (1x) is part of it.

Usage: ``python -m benchmarks.memory [--mb 200] [--encrypt]``; prints one JSON line per case.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

MB = 1 << 20


def _status(field: str) -> int:
    """A ``/proc/self/status`` memory field, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _setup(workdir: Path, encrypt: bool) -> Any:
    from exclusive_xcom.crypto import keyring_from
    from exclusive_xcom.ledger import Ledger, create_engine
    from exclusive_xcom.payload import Codec
    from exclusive_xcom.storage import BlobStore

    ledger = Ledger(create_engine(f"sqlite:///{workdir / 'ledger.db'}"))
    ledger.migrate()
    keys = keyring_from("bench-key" if encrypt else "", "", ledger.secret(), allow_plaintext=not encrypt)
    return ledger, Codec(keys, 1 * MB, BlobStore(f"file://{workdir / 'blobs'}"))


def _phase(phase: str, size: int, workdir: Path, encrypt: bool) -> dict[str, Any]:
    from exclusive_xcom.ledger import ITEMS, Claimant, ClaimRequest, Output, Production, Written

    ledger, codec = _setup(workdir, encrypt)
    output = Output("bench", "run", "produce")
    consumers = ("bench/consume",)
    if phase == "produce":
        value = {"blob": base64.b64encode(os.urandom(size * 3 // 4)).decode()}  # ~size bytes of JSON
        _reset_peak()
        before = _status("VmRSS")
        stored = codec.encode(value, "bench", output.ref())
        ledger.produce(Production(Written(output, 1, ITEMS, consumers), [stored]))
    else:
        _reset_peak()
        before = _status("VmRSS")
        claimant = Claimant("bench", "run", "consume")
        (claimed,) = ledger.claim(claimant, [ClaimRequest(Written(output, 1, ITEMS, consumers), 1)]).claims
        value = codec.decode(claimed.payloads[0])
        ledger.finish(claimant, claimed.ids)
    grew = _status("VmHWM") - before
    assert len(value["blob"]) >= size * 0.99
    return {"phase": phase, "payload_bytes": size, "peak_growth_bytes": grew, "ratio": round(grew / size, 2)}


def measure(size: int, encrypt: bool) -> list[dict[str, Any]]:
    """Both phases of one payload size, each in a fresh interpreter."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for phase in ("produce", "consume"):
            cmd = [sys.executable, "-m", "benchmarks.memory", "--child", phase, "--bytes", str(size), "--dir", tmp]
            root = Path(__file__).resolve().parents[1]
            out = subprocess.run(
                cmd + (["--encrypt"] if encrypt else []), check=True, capture_output=True, text=True, cwd=root
            ).stdout
            results.append({**json.loads(out.strip().splitlines()[-1]), "encrypted": encrypt})
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--encrypt", action="store_true")
    parser.add_argument("--child", choices=["produce", "consume"])
    parser.add_argument("--bytes", type=int)
    parser.add_argument("--dir")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_phase(args.child, args.bytes, Path(args.dir), args.encrypt)))
        return
    for size in (1024, args.mb * MB):
        for row in measure(size, args.encrypt):
            print(json.dumps(row))


if __name__ == "__main__":
    main()
