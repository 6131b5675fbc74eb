#!/usr/bin/env bash
# Capacity runs of one node (docs/capacity.md): a `fastws serve` node and `fastws bench` on this machine.
#
#   bash bench/capacity.sh connections N WORKERS HOLD_S [extra `fastws serve` options]
#       N idle connections on /echo held HOLD_S seconds: node RSS per connection (idle, and after
#       each echoed a message), keepalive CPU while held, ramp rate, failures
#   bash bench/capacity.sh broadcast N WORKERS MESSAGES RATE [extra `fastws serve` options]
#       N /feed subscribers, MESSAGES publications at RATE per second: delivery latency; with
#       WORKERS > 1 the workers share the room through a redis-server started here (each worker is
#       a backplane node, so 1 - 1/WORKERS of the deliveries cross nodes); /metrics' fan-out figures
#
# Results: bench/results/capacity/<mode>_<N>_w<WORKERS>.json.  Big runs take the whole machine;
# run them alone (they are benchmarks, not tests).
#
# EHASH=N bash bench/capacity.sh ...: the run happens in a new network namespace whose TCP table of
# established connections has N buckets (net.ipv4.tcp_child_ehash_entries, Linux 6.1+; root): at run
# time, what the boot parameter thash_entries=N does for a host.  This VM boots with 262,144 buckets,
# which a million loopback connections (two sockets each) turn into long chains walked per packet.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${EHASH:-}" ] && [ -z "${CAPACITY_NETNS:-}" ]; then
  sysctl -qw net.ipv4.tcp_child_ehash_entries="$EHASH"
  exec env CAPACITY_NETNS=1 unshare -n bash -c 'ip link set lo up && exec bash "$0" "$@"' "$0" "$@"
fi
[ -n "${CAPACITY_NETNS:-}" ] && echo "network namespace: $(sysctl -n net.ipv4.tcp_ehash_entries) established-hash buckets"
mode=$1 n=$2 workers=$3 a=$4
shift 4
b=""
if [ "$mode" = broadcast ]; then b=$1; shift; fi
port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
out=bench/results/capacity/${mode}_${n}_w${workers}.json
mkdir -p bench/results/capacity
serve=(python -m fastws serve --port "$port" --workers "$workers" --metrics --log-level warning "$@")
redis_port=""
if [ "$mode" = broadcast ] && [ "$workers" -gt 1 ]; then
  redis_port=$((port + 1))
  redis-server --port "$redis_port" --save '' --appendonly no --daemonize yes --logfile /dev/null >/dev/null
  serve+=(--redis "redis://127.0.0.1:$redis_port/0")
fi
"${serve[@]}" >"${out%.json}.server.log" 2>&1 &
server=$!
cleanup() {
  kill -TERM "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
  if [ -n "$redis_port" ]; then redis-cli -p "$redis_port" shutdown nosave >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT
for _ in $(seq 300); do
  if python -c "import socket; socket.create_connection(('127.0.0.1', $port), 1).close()" 2>/dev/null; then break; fi
  sleep 0.1
done
sleep $((workers / 8 + 1))  # every worker listening
if [ "$mode" = connections ]; then
  python -m fastws bench connections "ws://127.0.0.1:$port/echo" -c "$n" -d "$a" --concurrency 300 \
    --server-pid "$server" --json "$out"
  echo "server-side ends (/metrics): keepalive timeouts, and closes by code and by who closed first:"
  python - "$port" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics").read().decode()
for line in text.splitlines():
    if line.startswith(("fastws_keepalive_timeouts_total", "fastws_closes_total")):
        print("  " + line)
PY
else
  python -m fastws bench broadcast "ws://127.0.0.1:$port/feed" -c "$n" -n "$a" --rate "$b" -d 120 --grace 30 \
    --concurrency 300 --server-pid "$server" --json "$out"
  echo "server-side fan-out (/metrics; each publication reaches each worker once):"
  python - "$port" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics").read().decode()
v = {l.split()[0]: float(l.split()[1]) for l in text.splitlines() if l.startswith("fastws_fanout_") and " " in l}
n, s = v["fastws_fanout_recipients_sum"], v["fastws_fanout_duration_seconds_sum"]
print(f"  {n:,.0f} local deliveries in {s:.3f} s of fan-out: {1e6 * s / max(n, 1):.1f} µs per recipient "
      "(summed over the workers)")
PY
fi
