"""Server choice per policy, with weights; drained servers get nothing new."""

from __future__ import annotations

import ipaddress
from collections import Counter

import pytest

from overlay.tm.balancer import Service
from overlay.tm.config import ServerConfig, ServiceConfig

A = ipaddress.ip_address


def service(policy: str, weights: tuple[int, ...]) -> Service:
    servers = tuple(ServerConfig(A(f"203.0.113.{10 + i}"), 80, weight) for i, weight in enumerate(weights))
    return Service(ServiceConfig("web", A("203.0.113.80"), 80, "tcp", servers, policy))


def chosen(svc: Service, client: bytes) -> str:
    server = svc.choose(client)
    assert server is not None
    return str(server.address)


def test_round_robin_is_smooth_and_weighted() -> None:
    svc = service("round-robin", (5, 1, 1))
    picks = [chosen(svc, b"\x00" * 4)[-2:] for _ in range(7)]
    assert picks == ["10", "10", "11", "10", "12", "10", "10"]


def test_least_connections_counts_per_unit_of_weight() -> None:
    svc = service("least-connections", (2, 1))
    first, second = svc.servers
    first.connections, second.connections = 3, 1
    assert svc.choose(b"") is second       # 3/2 > 1/1
    first.connections = 1
    assert svc.choose(b"") is first        # 1/2 < 1/1


@pytest.mark.parametrize("weights, expected", [((1, 1, 1), (1 / 3, 1 / 3, 1 / 3)), ((3, 1, 0), (0.75, 0.25, 0.0))])
def test_source_hash_honours_weights(weights: tuple[int, ...], expected: tuple[float, ...]) -> None:
    svc = service("source-hash", weights)
    counts = Counter(chosen(svc, (i).to_bytes(4, "big")) for i in range(6000))
    for i, share in enumerate(expected):
        assert abs(counts[f"203.0.113.{10 + i}"] / 6000 - share) < 0.03


def test_source_hash_is_stable_and_removing_a_server_moves_only_its_clients() -> None:
    before = service("source-hash", (1, 1, 1))
    after = service("source-hash", (1, 1, 0))
    moved = 0
    for i in range(3000):
        client = (i * 7919).to_bytes(4, "big")
        old = chosen(before, client)
        assert chosen(before, client) == old
        if chosen(after, client) != old:
            moved += 1
            assert old == "203.0.113.12"
    assert 800 < moved < 1200


@pytest.mark.parametrize("policy", ["round-robin", "least-connections", "source-hash"])
def test_drained_servers_get_no_new_connections(policy: str) -> None:
    svc = service(policy, (0, 1))
    assert {chosen(svc, i.to_bytes(4, "big")) for i in range(20)} == {"203.0.113.11"}
    assert service(policy, (0, 0)).choose(b"\x01\x02\x03\x04") is None
