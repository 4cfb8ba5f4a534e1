#!/usr/bin/env bash
# soak.sh: issue 7 §3's soak and chaos run, which CI runs after the tests.
#
# Builds cmd/caddy and bench/soakcheck, starts one Caddy on loopback with a
# site whose keys are in a keys file (and, with redis-server, a second site
# whose keys and counters are in Redis), and drives it with wrk: a mix of
# valid keys (some of them about to be added or already removed), invalid
# keys and no key. Meanwhile, for 60 s, the keys file is rewritten every
# 200 ms (a key added and one removed each time, written atomically) and
# `caddy reload --force` alternates between two equivalent configs every
# second. Then it checks, from the JSON access log (bench/soakcheck) and
# the admin endpoint:
#
#   - no 5xx (access log and wrk's own count);
#   - no request admitted with a key that started more than 5 s (the
#     documented bound) after the key's removal, and none refused more
#     than 5 s after its addition;
#   - a key driven to its rate limit before the chaos stays limited
#     through it (reloads do not reset limiter state);
#   - every reload succeeded, no keys file failed to load, and the running
#     config has one handler per site (old ones were cleaned up);
#   - goroutines (go_goroutines on the admin /metrics) and RSS (VmRSS)
#     back within +50 and max(1.5×, +64 MiB) of their steady state before
#     the chaos, a few seconds after it.
#
# With redis-server: a 20-s phase on the Redis site (store redis, limits
# redis, on_store_error allow_cached, on_limiter_error local), reloads
# still running, during which redis-server is killed and started again 3 s
# later on the same port and append-only file. The mode must hold: no 5xx,
# valid (cached) keys admitted with "degraded" during the outage, never
# another mode's outcome, an invalid key never admitted, and normal
# service before and after it. Reloads go on during the outage: the new
# config's handler keeps the old one's lookup cache, so allow_cached
# still has the cached keys to admit. --pause-redis-reloads pauses them
# from the kill until 3 s after Redis is back.
#
#   bench/soak.sh [--short] [--pause-redis-reloads]
#
# --short: 15 s of chaos and a 14-s Redis phase, for a local smoke run.
# KEEP=1 keeps the work directory. Needs wrk and curl; the Redis phase is
# skipped without redis-server (a failure with APIKEY_REQUIRE_REDIS=1).
# Exits 1 on any violation.
set -euo pipefail
cd "$(dirname "$0")/.."
export LC_ALL=C # EPOCHREALTIME with a decimal point

chaos=60 redis_secs=20 redis_reloads=1
while [ $# -gt 0 ]; do
	case $1 in
	--short) chaos=15 redis_secs=14 ;;
	--pause-redis-reloads) redis_reloads=0 ;;
	*) echo "usage: bench/soak.sh [--short] [--pause-redis-reloads]" >&2; exit 2 ;;
	esac
	shift
done
for c in wrk curl pgrep timeout; do
	command -v $c >/dev/null || { echo "$c not found (apt-get install -y $c)" >&2; exit 1; }
done
have_redis=0
if command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then
	have_redis=1
elif [ "${APIKEY_REQUIRE_REDIS:-}" = 1 ]; then
	echo "redis-server not found, and APIKEY_REQUIRE_REDIS=1" >&2
	exit 1
else
	echo "redis-server not found: the Redis phase is skipped (apt-get install -y redis-server)" >&2
fi

window=40 stable=8 nredis=8 bound=5s probe_rate=5/1h probe_burst=5
work=$(mktemp -d /tmp/apikey-soak.XXXXXX)
# killtree pid: the process and everything it started, children first.
killtree() {
	local c
	for c in $(pgrep -P "$1" 2>/dev/null); do killtree "$c"; done
	kill "$1" 2>/dev/null || true
}
# killtree_hard pid: killtree, then SIGKILL for what is still there after 5 s.
killtree_hard() {
	local pids=("$1") c
	for c in $(pgrep -P "$1" 2>/dev/null); do pids+=("$c"); done
	killtree "$1"
	for _ in $(seq 50); do kill -0 "${pids[@]}" 2>/dev/null || return 0; sleep 0.1; done
	kill -9 "${pids[@]}" 2>/dev/null || true
}
# cleanup kills the background jobs still running (so no process ID
# that may have been reused) and what they started.
cleanup() {
	touch "$work/stop" "$work/done"
	for p in $(jobs -p); do killtree_hard "$p"; done
	wait 2>/dev/null || true
	[ -n "${KEEP:-}" ] && echo "kept $work" >&2 || rm -rf "$work"
}
trap cleanup EXIT
# A signal (CI's timeout, Ctrl-C) exits through the EXIT trap, so that
# nothing started here is left running.
trap 'exit 130' INT
trap 'exit 143' TERM
t0=$SECONDS
say() { printf '[%3ds] %s\n' $((SECONDS - t0)) "$*" >&2; }
failures=()
bad() { failures+=("$*"); echo "FAIL: $*" >&2; }

say "building caddy and soakcheck"
go build -o "$work/caddy" ./cmd/caddy
go build -o "$work/soakcheck" ./bench/soakcheck
export XDG_DATA_HOME=$work/data XDG_CONFIG_HOME=$work/config
mkdir -p "$XDG_DATA_HOME" "$XDG_CONFIG_HOME" "$work/redis"
ports=$("$work/soakcheck" ports 4)
read -r admin port rport redis_port <<<"$ports"

# Keys: churn key i is in versions i-window+1 to i of the keys file, so
# each rewrite adds one and removes one.
suffix=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
nchurn=$((chaos * 5 + window + 100))
"$work/soakcheck" keys -dir "$work" -suffix "$suffix" -churn $nchurn -stable $stable -redis $nredis -probe-rate $probe_rate
probe=$(cat "$work/probe.txt")
# write_keys g: version g of the keys file, written beside it and renamed.
write_keys() {
	{
		echo '{"keys": ['
		sed -n "$(($1 + 1)),$(($1 + window))p" "$work/churn.jsonl"
		cat "$work/fixed.jsonl"
		echo ']}'
	} >"$work/keys.json.tmp"
	mv "$work/keys.json.tmp" "$work/keys.json"
}
tb=$EPOCHREALTIME
write_keys 0
echo "0 $tb $EPOCHREALTIME" >"$work/writes.log"
echo 0 >"$work/gen"

# Redis, with an append-only file so that its keys survive the restart.
start_redis() {
	redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly yes --appendfsync always \
		--dir "$work/redis" --logfile "$work/redis/redis.log" --daemonize no &
	redis_pid=$!
	for _ in $(seq 100); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && return 0; sleep 0.05; done
	echo "redis-server did not answer on port $redis_port" >&2
	return 1
}
if [ $have_redis = 1 ]; then
	start_redis
	"$work/caddy" api-key import --redis 127.0.0.1:$redis_port "$work/redis-keys.json" >"$work/import.log" 2>&1 ||
		{ cat "$work/import.log" >&2; exit 1; }
fi

# Two configs that differ in a response header only, so that a reload
# really changes the config (and --force reloads even an unchanged one).
site_log() {
	printf '\tlog {\n\t\toutput file %s {\n\t\t\troll_disabled\n\t\t}\n' "$1"
	printf '\t\tformat filter {\n\t\t\trequest>headers delete\n\t\t\tresp_headers delete\n\t\t\twrap json\n\t\t}\n\t}\n'
}
for v in a b; do
	{
		printf '{\n\tadmin 127.0.0.1:%d\n\tpersist_config off\n}\n' "$admin"
		printf 'http://127.0.0.1:%d {\n\theader X-Soak-Config %s\n' "$port" "$v"
		site_log "$work/access.log"
		printf '\tapi_key {\n\t\tkeys_file %s\n\t\trate 1000000/1s\n\t\tmax_failures off\n\t}\n\trespond "ok"\n}\n' "$work/keys.json"
		if [ $have_redis = 1 ]; then
			printf 'http://127.0.0.1:%d {\n\theader X-Soak-Config %s\n' "$rport" "$v"
			site_log "$work/redis-access.log"
			# timeout 250ms: with the default 50ms, the CPU a reload takes
			# on two shared cores times out a few commands around each
			# reload (each then degraded, as documented), blurring the
			# outage's picture.
			printf '\tapi_key {\n\t\tredis {\n\t\t\taddress 127.0.0.1:%d\n\t\t\ttimeout 250ms\n\t\t}\n' "$redis_port"
			printf '\t\tstore redis\n\t\tlimits redis\n\t\ton_store_error allow_cached\n\t\ton_limiter_error local\n'
			printf '\t\trate 1000000/1s\n\t\tmax_failures off\n\t}\n\trespond "ok"\n}\n'
		fi
	} >"$work/Caddyfile.$v"
done
nsites=$((1 + have_redis))

"$work/caddy" run --config "$work/Caddyfile.a" --adapter caddyfile >"$work/caddy.log" 2>&1 &
caddy_pid=$!
status() { curl -s -m 5 -o /dev/null -w '%{http_code}' ${2:+-H "X-API-Key: $2"} "$1" 2>/dev/null || true; }
for _ in $(seq 300); do [ "$(status "http://127.0.0.1:$port/ready")" = 401 ] && break; sleep 0.1; done
[ "$(status "http://127.0.0.1:$port/ready")" = 401 ] || { cat "$work/caddy.log" >&2; echo "caddy did not start" >&2; exit 1; }
say "caddy ready (pid $caddy_pid, admin 127.0.0.1:$admin, site :$port$([ $have_redis = 1 ] && echo ", Redis site :$rport"))"

cat >"$work/soak.lua" <<'LUA'
-- soak.lua: per request, a valid key, an invalid one or none. The path
-- says which (see bench/soakcheck). SOAK_MODE=file: stable keys /s/<i>;
-- churn keys /c/<i> from 50 before the current version of the keys file
-- (read from SOAK_GEN) to 10 past its last one: removed long ago,
-- removed recently, present, not yet added. SOAK_MODE=redis: the keys in
-- Redis, /v/<i>. Then invalid keys /x and no key /m. Keys come as a
-- Bearer token or in X-API-Key, at random.
local suffix = os.getenv("SOAK_SUFFIX")
local mode = os.getenv("SOAK_MODE")
local genfile = os.getenv("SOAK_GEN")
local window = tonumber(os.getenv("SOAK_WINDOW"))
local nstable = tonumber(os.getenv("SOAK_STABLE"))
local nredis = tonumber(os.getenv("SOAK_REDIS"))
local gen, n = 0, 0
fivexx = 0

local function readgen()
  local f = io.open(genfile, "r")
  if f then
    local g = f:read("*n")
    f:close()
    if g then gen = g end
  end
end

local function keyed(path, key)
  if math.random(2) == 1 then
    return wrk.format("GET", path, { ["X-API-Key"] = key })
  end
  return wrk.format("GET", path, { ["Authorization"] = "Bearer " .. key })
end

function init(args)
  math.randomseed(os.time())
  readgen()
end

function request()
  n = n + 1
  if n % 256 == 0 then readgen() end
  local r = math.random(100)
  if mode == "redis" then
    if r <= 70 then
      local i = math.random(nredis) - 1
      return keyed("/v/" .. i, "soak-redis-" .. i .. "-" .. suffix)
    end
  elseif r <= 35 then
    local i = math.random(nstable) - 1
    return keyed("/s/" .. i, "soak-stable-" .. i .. "-" .. suffix)
  elseif r <= 75 then
    local i = math.abs(gen + math.random(-50, window + 10))
    return keyed("/c/" .. i, "soak-churn-" .. i .. "-" .. suffix)
  end
  if r <= 90 then
    return keyed("/x", "soak-invalid-" .. math.random(1000000000) .. "-" .. suffix)
  end
  return wrk.format("GET", "/m")
end

function response(status, headers, body)
  if status >= 500 then fivexx = fivexx + 1 end
end

local threads = {}
function setup(thread) table.insert(threads, thread) end

function done(summary, latency, requests)
  local s = 0
  for _, t in ipairs(threads) do s = s + (t:get("fivexx") or 0) end
  io.write(string.format("wrk 5xx: %d\n", s))
end
LUA
export SOAK_SUFFIX=$suffix SOAK_GEN=$work/gen SOAK_WINDOW=$window SOAK_STABLE=$stable SOAK_REDIS=$nredis
# drive mode url secs out: wrk -t1 -c8 with soak.lua.
drive() { SOAK_MODE=$1 wrk -t1 -c8 -d"$3s" --timeout 5s -s "$work/soak.lua" "$2" >"$4" 2>&1; }
# wrk_summary out: requests, 5xx and socket errors from wrk's output.
wrk_summary() {
	awk '/requests in/ {r = $1} /Requests\/sec/ {s = $2} /wrk 5xx/ {f = $3}
		/Socket errors/ {e = $0; sub(/.*Socket errors: /, "", e)}
		END {printf "%s requests (%s/s), 5xx by wrk: %s, socket errors: %s", r, s, f, (e == "" ? "none" : e)}' "$1"
}
check_wrk() { # out what
	local f
	f=$(awk '/wrk 5xx/ {print $3}' "$1")
	[ "$f" = 0 ] || bad "$2: wrk counted ${f:-no} 5xx answers (see $1)"
}
metric() { curl -s -m 5 "http://127.0.0.1:$admin/metrics" | awk -v m="$1" '$1 == m && !done {print $2; done = 1}'; }
goroutines() { metric go_goroutines; }
rss_kb() { awk '/VmRSS/ {print $2}' /proc/"$caddy_pid"/status; }
handlers() { curl -s -m 5 "http://127.0.0.1:$admin/api_key/usage" | grep -o '"handler"' | wc -l; }

# sampler: every 0.5 s, the time, Caddy's CPU ticks and the load
# average, so that a stall of the whole machine (a gap between samples:
# other work on shared cores) can be told from a stall of Caddy.
sampler() {
	while [ ! -e "$work/done" ]; do
		echo "$EPOCHREALTIME $(awk '{print $14 + $15}' /proc/"$caddy_pid"/stat 2>/dev/null) $(cut -d' ' -f1 /proc/loadavg)" >>"$work/samples.log"
		sleep 0.5
	done
}
sampler &
# machine_gap: the longest gap between two samples, and the highest load.
machine_gap() {
	awk 'NR > 1 && $1 - t > g {g = $1 - t} {t = $1; if ($3 > l) l = $3} END {printf "longest gap between 0.5-s samples %.2f s, load average up to %s", g, l}' "$work/samples.log"
}

# Steady state: a warm-up under load, then the highest of three samples.
say "warm-up: 5 s of load"
drive file "http://127.0.0.1:$port" 5 "$work/wrk-warmup.txt"
sleep 2
base_g=0 base_rss=0
for _ in 1 2 3; do
	sleep 1
	g=$(goroutines) r=$(rss_kb)
	[ "$g" -gt $base_g ] && base_g=$g
	[ "$r" -gt $base_rss ] && base_rss=$r
done
say "steady state: $base_g goroutines, RSS $((base_rss / 1024)) MiB"

# The probe key: its burst spent before the chaos.
probe_codes=""
for _ in $(seq $((probe_burst + 1))); do probe_codes+="$(status "http://127.0.0.1:$port/p" "$probe")"; done
[ "$probe_codes" = "$(printf '200%.0s' $(seq $probe_burst))429" ] ||
	bad "probe key: $((probe_burst + 1)) requests answered $probe_codes, want $probe_burst × 200 then 429"

# reload_loop: caddy reload --force every second, alternating configs,
# until $work/stop exists; none while $work/pause exists (and then
# $work/paused says that none is under way).
reload_loop() {
	local n=0 v
	while [ ! -e "$work/stop" ]; do
		sleep 1
		if [ -e "$work/pause" ]; then
			touch "$work/paused"
			continue
		fi
		rm -f "$work/paused"
		n=$((n + 1)) v=a
		[ $((n % 2)) = 1 ] && v=b
		if timeout 15 "$work/caddy" reload --config "$work/Caddyfile.$v" --adapter caddyfile --address "127.0.0.1:$admin" --force >>"$work/reload-output.log" 2>&1; then
			echo "$EPOCHREALTIME ok $v" >>"$work/reloads.log"
		else
			echo "$EPOCHREALTIME failed $v" >>"$work/reloads.log"
		fi
	done
}
# rewrite_loop: version g+1 of the keys file every 200 ms, recording the
# times just before and after each rename.
rewrite_loop() {
	local g=0 tb
	while [ ! -e "$work/stop" ] && [ $((g + 1 + window)) -le $nchurn ]; do
		sleep 0.2
		g=$((g + 1))
		tb=$EPOCHREALTIME
		write_keys $g
		echo "$g $tb $EPOCHREALTIME" >>"$work/writes.log"
		echo $g >"$work/gen.tmp"
		mv "$work/gen.tmp" "$work/gen"
	done
}

say "chaos: ${chaos} s of load, keys file rewritten every 200 ms, caddy reload every second"
: >"$work/reloads.log"
rm -f "$work/stop"
drive file "http://127.0.0.1:$port" $((chaos + 1)) "$work/wrk-chaos.txt" &
wrk_pid=$!
rewrite_loop &
rewrite_pid=$!
# probe_status: the probe key's status. A request that gets no answer at
# all (000: the connection was closed as the old server stopped at a
# reload, which wrk counts as a read error too) says nothing about the
# limit, so it is sent again, up to 3 times; the retries are counted.
probe_status() {
	local c i
	for i in 1 2 3; do
		c=$(status "http://127.0.0.1:$port/p" "$probe")
		[ "$c" != 000 ] && break
		echo "$SECONDS" >>"$work/probe-retries.log"
		sleep 0.2
	done
	echo "$c"
}
reload_loop &
reload_pid=$!
end=$((SECONDS + chaos))
next_probe=$((SECONDS + 10))
while [ $SECONDS -lt $end ]; do
	sleep 0.5
	if [ $SECONDS -ge $next_probe ]; then
		c=$(probe_status)
		echo "$SECONDS $c" >>"$work/probes.log"
		[ "$c" = 429 ] || bad "probe key answered $c during the chaos ($(grep -c ok "$work/reloads.log") reloads so far), want 429"
		next_probe=$((SECONDS + 10))
	fi
done
touch "$work/stop"
wait "$rewrite_pid" "$reload_pid" "$wrk_pid"
reloads_ok=$(grep -c ' ok ' "$work/reloads.log" || true)
reloads_failed=$(grep -c ' failed ' "$work/reloads.log" || true)
writes=$(($(wc -l <"$work/writes.log") - 1))
say "chaos over: $(wrk_summary "$work/wrk-chaos.txt"); $writes rewrites, $reloads_ok reloads ($reloads_failed failed)"
check_wrk "$work/wrk-chaos.txt" "chaos"
[ "$reloads_failed" = 0 ] || bad "$reloads_failed of $((reloads_ok + reloads_failed)) reloads failed (see reload-output.log)"
[ "$reloads_ok" -ge $((chaos / 2)) ] || bad "only $reloads_ok reloads in ${chaos} s"
c=$(probe_status)
[ "$c" = 429 ] || bad "probe key answered $c after $reloads_ok reloads, want 429 (limiter state reset by a reload?)"
say "probe key after $reloads_ok reloads: $c (and $(awk '{print $2}' "$work/probes.log" | sort | uniq -c | awk '{printf "%s×%s ", $1, $2}')during the chaos; $(cat "$work/probe-retries.log" 2>/dev/null | wc -l) sent again after no answer)"
reload_errors=$(curl -s -m 5 "http://127.0.0.1:$admin/metrics" | awk '/^caddy_api_key_keys_file_reload_errors_total/ {s += $2} END {print s + 0}')
[ "$reload_errors" = 0 ] || bad "$reload_errors versions of the keys file failed to load (they are written atomically)"
h=$(handlers)
[ "$h" = $nsites ] || bad "the admin API lists $h api_key handlers after $reloads_ok reloads, want $nsites"

# settle what: goroutines and RSS back within tolerance of the steady
# state, waiting up to 20 s; prints the figures.
settle() {
	local g r i lim_g lim_rss
	lim_g=$((base_g + 50))
	lim_rss=$((base_rss * 3 / 2))
	[ $((base_rss + 65536)) -gt $lim_rss ] && lim_rss=$((base_rss + 65536))
	for i in $(seq 20); do
		sleep 1
		g=$(goroutines) r=$(rss_kb)
		[ "$g" -le $lim_g ] && [ "$r" -le $lim_rss ] && break
	done
	say "$1: $g goroutines (steady $base_g, limit $lim_g), RSS $((r / 1024)) MiB (steady $((base_rss / 1024)), limit $((lim_rss / 1024))), after ${i} s"
	[ "$g" -le $lim_g ] || bad "$1: $g goroutines, steady state $base_g (limit $lim_g)"
	[ "$r" -le $lim_rss ] || bad "$1: RSS $((r / 1024)) MiB, steady state $((base_rss / 1024)) MiB (limit $((lim_rss / 1024)))"
	echo "$g $r" >"$work/settle-$2"
}
settle "after the chaos" chaos

echo
"$work/soakcheck" file -log "$work/access.log" -writes "$work/writes.log" -window $window -bound $bound -probe-limit $probe_burst ||
	bad "the keys-file site's access log (above)"
echo

if [ $have_redis = 1 ]; then
	say "Redis phase: ${redis_secs} s of load on the Redis site, reloads every second ($([ $redis_reloads = 1 ] && echo "also" || echo "not") while Redis is away), redis-server killed at about 6 s and back 3 s later"
	rm -f "$work/stop"
	drive redis "http://127.0.0.1:$rport" "$redis_secs" "$work/wrk-redis.txt" &
	wrk_pid=$!
	reload_loop &
	reload_pid=$!
	rstart=$SECONDS
	sleep 5
	if [ $redis_reloads = 0 ]; then
		# No reload may be under way when Redis goes; then a moment
		# for requests to cache the keys again after the last one.
		touch "$work/pause"
		for _ in $(seq 100); do [ -e "$work/paused" ] && break; sleep 0.1; done
		sleep 0.5
	fi
	kill -9 "$redis_pid"
	wait "$redis_pid" 2>/dev/null || true
	down=$EPOCHREALTIME
	sleep 3
	start_redis
	up=$EPOCHREALTIME
	say "redis-server down for $(awk -v a="$down" -v b="$up" 'BEGIN {printf "%.1f", b - a}') s"
	sleep 3
	rm -f "$work/pause" "$work/paused"
	wait "$wrk_pid"
	touch "$work/stop"
	wait "$reload_pid"
	rreloads_ok=$(grep -c ' ok ' "$work/reloads.log" || true)
	rreloads_failed=$(grep -c ' failed ' "$work/reloads.log" || true)
	say "Redis phase over after $((SECONDS - rstart)) s: $(wrk_summary "$work/wrk-redis.txt"); $((rreloads_ok - reloads_ok)) more reloads ($((rreloads_failed - reloads_failed)) failed)"
	check_wrk "$work/wrk-redis.txt" "Redis phase"
	[ "$rreloads_failed" = "$reloads_failed" ] || bad "$((rreloads_failed - reloads_failed)) reloads failed in the Redis phase (see reload-output.log)"
	h=$(handlers)
	[ "$h" = $nsites ] || bad "the admin API lists $h api_key handlers after the Redis phase, want $nsites"
	echo
	"$work/soakcheck" redis -log "$work/redis-access.log" -down "$down" -up "$up" -settle 3s ||
		bad "the Redis site's access log (above)"
	echo
	settle "after the Redis phase" redis
fi

kill -0 "$caddy_pid" 2>/dev/null || bad "caddy exited"
touch "$work/done"
echo
echo "Soak and chaos run: $(date -u +%Y-%m-%d), $(nproc) cores, $(go version | cut -d' ' -f3), $((SECONDS - t0)) s in all"
echo "  machine: $(machine_gap)"
echo "  chaos ${chaos} s: $(wrk_summary "$work/wrk-chaos.txt"); $writes keys-file rewrites, $reloads_ok reloads"
read -r g r <"$work/settle-chaos"
echo "  goroutines $base_g steady, $g after; RSS $((base_rss / 1024)) MiB steady, $((r / 1024)) MiB after"
if [ $have_redis = 1 ]; then
	read -r g r <"$work/settle-redis"
	echo "  Redis phase ${redis_secs} s: $(wrk_summary "$work/wrk-redis.txt"); after it $g goroutines, RSS $((r / 1024)) MiB"
fi
if [ ${#failures[@]} -gt 0 ]; then
	echo "FAILED (${#failures[@]}):"
	printf '  - %s\n' "${failures[@]}"
	exit 1
fi
echo "PASSED"
