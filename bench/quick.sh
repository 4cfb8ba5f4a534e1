#!/usr/bin/env bash
# quick.sh: api_key against plain Caddy, end to end, in one run.
#
# Builds cmd/caddy, starts one Caddy with two sites on loopback (a plain
# respond, and the same respond behind api_key with a rate limit that never
# runs out), and drives both with wrk in alternating rounds. Prints each
# round and the ratio of the medians. Needs wrk (apt-get install -y wrk).
#
#   bench/quick.sh [rounds] [seconds-per-round]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
secs=${2:-5}
command -v wrk >/dev/null || { echo "wrk not found: apt-get install -y wrk" >&2; exit 1; }

work=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
go build -o "$work/caddy" ./cmd/caddy

key="bench_$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
printf '{"keys": [{"id": "bench", "hash": "sha256:%s"}]}\n' \
	"$(printf %s "$key" | sha256sum | cut -d' ' -f1)" >"$work/keys.json"
cat >"$work/Caddyfile" <<CADDY
{
	admin off
	persist_config off
}
http://127.0.0.1:18080 {
	respond "ok"
}
http://127.0.0.1:18081 {
	api_key {
		keys_file $work/keys.json
		rate 1000000000/1s
	}
	respond "ok"
}
CADDY
"$work/caddy" run --config "$work/Caddyfile" >"$work/caddy.log" 2>&1 &
pid=$!
for _ in $(seq 50); do
	curl -fsS -o /dev/null -H "X-API-Key: $key" http://127.0.0.1:18081/ 2>/dev/null && break
	sleep 0.2
done
curl -fsS -o /dev/null -H "X-API-Key: $key" http://127.0.0.1:18081/

rps() { wrk -t1 -c32 -d"${secs}s" "$@" | awk '/Requests\/sec/ {print $2}'; }
plain=() keyed=()
for r in $(seq "$rounds"); do
	p=$(rps http://127.0.0.1:18080/)
	k=$(rps -H "X-API-Key: $key" http://127.0.0.1:18081/)
	plain+=("$p") keyed+=("$k")
	printf 'round %d: plain %s req/s, api_key %s req/s\n' "$r" "$p" "$k"
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
mp=$(median "${plain[@]}") mk=$(median "${keyed[@]}")
awk -v p="$mp" -v k="$mk" 'BEGIN {printf "median: plain %.0f req/s, api_key %.0f req/s, ratio %.3f\n", p, k, k/p}'
if grep -q '"status":5' "$work/caddy.log"; then echo "5xx seen in the log" >&2; exit 1; fi
