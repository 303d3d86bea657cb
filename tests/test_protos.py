"""The committed gRPC stubs are exactly what grpcio-tools generates from protos/."""

from attnserve.protos import stale_files


def test_generated_stubs_are_up_to_date() -> None:
    assert stale_files() == [], "stale stubs: run python -m attnserve.protos"
