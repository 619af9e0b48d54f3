"""tests/engines.py itself: the servers come up, each test gets its own database, a Redis
restart keeps the port, and a stopped server is gone."""

from __future__ import annotations

import socket

from tests.engines import PostgresServer, RedisServer


def test_postgres_url_is_a_fresh_database(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    name = postgres_url.rsplit("/", 1)[1]
    postgres_server.sql(name, "CREATE TABLE t (x int); INSERT INTO t VALUES (7)")
    assert postgres_server.sql(name, "SELECT x FROM t").strip() == "7"
    assert postgres_server.sql(name, "SELECT current_user").strip() == "postgres"


def test_redis_restart_keeps_port_and_loses_keys(private_redis: RedisServer) -> None:
    port = private_redis.port
    assert private_redis.command("SET k v", "GET k") == ["+OK", "$1"]
    private_redis.stop()
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        raise AssertionError("redis still listening after stop()")
    except OSError:
        pass
    private_redis.start()
    assert private_redis.port == port
    assert private_redis.command("GET k") == ["$-1"]


def test_redis_url_db_is_empty(redis_server: RedisServer, redis_url: str) -> None:
    db = redis_url.rsplit("/", 1)[1]
    assert redis_server.command(f"SELECT {db}", "DBSIZE") == ["+OK", ":0"]
