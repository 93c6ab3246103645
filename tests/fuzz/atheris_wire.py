"""Coverage-guided fuzzing (atheris/libFuzzer) of the wire decoders and the record validator.

Run directly: `python tests/fuzz/atheris_wire.py -atheris_runs=50000` (libFuzzer flags
work too, e.g. `-max_total_time=600`). Any exception other than the typed refusals
(`MalformedMessage`, `RecordRejected`) is a crash that libFuzzer reports with its input.
"""

import sys

import atheris

with atheris.instrument_imports():
    import importlib
    import pkgutil

    import darkbloom.wire
    from darkbloom.errors import MalformedMessage, RecordRejected
    from darkbloom.identity import Identity
    from darkbloom.ledger.receipts import decode_strict
    from darkbloom.p2p.keys import caps_key, peer_id_from_public_key
    from darkbloom.p2p.records import verify_record
    from darkbloom.wire.codec import FrameDecoder, decode, encode, message_types

    for _mod in pkgutil.iter_modules(darkbloom.wire.__path__):
        importlib.import_module(f"darkbloom.wire.{_mod.name}")

TYPES = [cls for _, cls in sorted(message_types().items())]
KEY = caps_key(peer_id_from_public_key(Identity.generate().public_key))


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 3)
    blob = fdp.ConsumeBytes(fdp.remaining_bytes())
    try:
        if mode == 0:
            msg = decode(blob)
            assert decode(encode(msg)) == msg
        elif mode == 1:
            decoder = FrameDecoder(4096)
            decoder.feed(blob)
            while (body := decoder.next_body()) is not None:
                decode(body)
        elif mode == 2:
            decode_strict(blob, TYPES[len(blob) % len(TYPES)])
        else:
            verify_record(KEY, blob, now_ms=1_700_000_000_000, max_bytes=16384)
    except (MalformedMessage, RecordRejected):
        pass


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
