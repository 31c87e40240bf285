#!/usr/bin/env bash
# Make sure a Redis server answers on 127.0.0.1:6379 (the Redis store's tests use it, each test
# under its own key prefix). Starts one, keeping nothing on disk, if none answers.
if command -v redis-cli >/dev/null 2>&1 && redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  exit 0
fi
if command -v redis-server >/dev/null 2>&1; then
  mkdir -p /tmp/twivapi-redis
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /tmp/twivapi-redis --logfile /tmp/twivapi-redis/redis.log
  for _ in $(seq 1 50); do
    redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && exit 0
    sleep 0.1
  done
fi
echo "ensure-redis: no Redis server on 127.0.0.1:6379 (the Redis tests will say they were skipped)" >&2
exit 0
