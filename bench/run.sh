#!/usr/bin/env bash
# run.sh: issue 6's end-to-end performance suite, in one run.
#
# Builds cmd/caddy and bench/genkeys, writes keys files of 1,000 and
# 1,000,000 keys, starts Caddy with a site per configuration (plain
# respond; api_key with 1k keys, 1M keys, 1M keys + rate, + rate, + quota,
# + Redis counters, + Redis keys; each without and with a JSON access log
# to a file; 1k keys with a declared prefix; the 1M-key sites, with a
# plain site of their own, in a second Caddy process), a Redis, and nginx (plain
# empty_gif; map $http_x_api_key + limit_req keyed by the mapped id, 1k and
# 1M keys; plain and 1k keys again with a JSON access log). Drives each
# with wrk with a Zipf-like mix of 10,000 valid keys, each site in pairs of
# runs back to back with its reference (plain Caddy, say), and prints the
# medians of req/s, p50 and p99, the server CPU per request, and each
# site's ratio to its reference: the median of the pairs' ratios. Also
# invalid-key floods (random keys; random keys in a declared prefix's
# format). Then: a reload of the 1M keys file under load, and the 1M set's
# load time and resident memory.
#
#   bench/run.sh [--smoke] [--rounds N] [--secs S]
#
# --smoke: one pair of 1-s runs per site (about 2 minutes in all). Default:
# 5 pairs of 2-s runs (under 10 minutes). Needs wrk, redis-server; nginx rows are
# skipped without nginx. Nothing fails on a number: this script measures.
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=5 secs=2 smoke=0
while [ $# -gt 0 ]; do
	case $1 in
	--smoke) smoke=1 rounds=1 secs=1 ;;
	--rounds) rounds=$2; shift ;;
	--secs) secs=$2; shift ;;
	*) echo "usage: bench/run.sh [--smoke] [--rounds N] [--secs S]" >&2; exit 2 ;;
	esac
	shift
done
[[ $rounds =~ ^[1-9][0-9]*$ && $secs =~ ^[1-9][0-9]*$ ]] || { echo "--rounds and --secs take a whole number from 1" >&2; exit 2; }
for c in wrk redis-server curl; do
	command -v $c >/dev/null || { echo "$c not found (apt-get install -y $c)" >&2; exit 1; }
done
have_nginx=0
command -v nginx >/dev/null && have_nginx=1 || echo "nginx not found: its rows are skipped (apt-get install -y nginx)" >&2

conns=16
work=$(mktemp -d /tmp/apikey-bench.XXXXXX)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	[ -n "${KEEP:-}" ] && echo "kept $work" >&2 || rm -rf "$work"
}
trap cleanup EXIT
t0=$(date +%s)
say() { printf '[%3ds] %s\n' $(($(date +%s) - t0)) "$*" >&2; }

say "building caddy and genkeys"
go build -o "$work/caddy" ./cmd/caddy
go build -o "$work/genkeys" ./bench/genkeys
"$work/genkeys" -n 1000 -keys "$work/keys1k.json" -plain "$work/plain.txt" -plain-n 1000 -nginx "$work/map1k.conf"
"$work/genkeys" -n 1000000 -keys "$work/keys1m.json" -plain "$work/plain1m.txt" -plain-n 10000 -nginx "$work/map1m.conf"
# The reload test swaps in a file with one more key (a changed file).
"$work/genkeys" -n 1000000 -extra 1 -keys "$work/keys1m-b.json"

cat >"$work/zipf.lua" <<'LUA'
-- zipf.lua: wrk sends valid keys in a Zipf-like mix (key i, from 1, is
-- chosen with weight 1/i) from the plaintext keys listed in KEYS_FILE
-- (bench/genkeys -plain). Requests are formatted once, in init, so that
-- wrk spends the same per request on every site it drives.
local path = os.getenv("KEYS_FILE")
local reqs, picks = {}, {}
local NPICK = 65536

function init(args)
  local keys = {}
  for line in io.lines(path) do keys[#keys + 1] = line end
  for i, k in ipairs(keys) do
    reqs[i] = wrk.format("GET", "/", { ["X-API-Key"] = k })
  end
  -- Inverse CDF of weights 1/i, sampled into a table of NPICK entries.
  local total = 0
  for i = 1, #keys do total = total + 1 / i end
  local acc, i = 0, 1
  for j = 1, NPICK do
    local target = (j - 0.5) / NPICK * total
    while acc + 1 / i < target and i < #keys do acc = acc + 1 / i; i = i + 1 end
    picks[j] = i
  end
  math.randomseed(os.time() + (args and #args or 0))
end

function request()
  return reqs[picks[math.random(NPICK)]]
end
LUA
cat >"$work/random.lua" <<'LUA'
-- random.lua: an invalid-key flood. wrk sends random keys, PREFIX then 38
-- random characters, from 200,000 requests formatted once in init (as
-- zipf.lua does, so that the client spends no more per request than on
-- the valid rows). A key comes round again only after 199,999 others
-- (with a keys file, unknown keys are not cached at all).
local chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
local prefix = os.getenv("PREFIX") or "rnd-"
local reqs, n, N = {}, 0, 200000

function init(args)
  math.randomseed(os.time() + (args and #args or 0))
  local t = {}
  for j = 1, N do
    for i = 1, 38 do
      local c = math.random(#chars)
      t[i] = chars:sub(c, c)
    end
    reqs[j] = wrk.format("GET", "/", { ["X-API-Key"] = prefix .. table.concat(t) })
  end
end

function request()
  n = n % N + 1
  return reqs[n]
end
LUA

# wait_for url [header]: until it answers 200, at most ~120 s.
wait_for() {
	for _ in $(seq 600); do
		[ "$(curl -s -o /dev/null -w '%{http_code}' ${2:+-H "$2"} "$1" 2>/dev/null)" = 200 ] && return 0
		sleep 0.2
	done
	echo "no 200 from $1" >&2
	return 1
}
rss_kb() { awk '/VmRSS/ {print $2}' /proc/"$1"/status; }
# cpu_ticks pid...: utime+stime of the processes, in clock ticks.
cpu_ticks() { local s=0 p; for p in "$@"; do [ -r /proc/$p/stat ] && s=$((s + $(awk '{print $14 + $15}' /proc/$p/stat))); done; echo $s; }
hz=$(getconf CLK_TCK)

# --- Redis, with the 1k keys imported for store redis.
redis_port=16379
redis-server --port $redis_port --bind 127.0.0.1 --save '' --appendonly no --daemonize no >"$work/redis.log" 2>&1 &
redis_pid=$!; pids+=("$redis_pid")
for _ in $(seq 50); do redis-cli -p $redis_port ping >/dev/null 2>&1 && break; sleep 0.1; done
"$work/caddy" api-key import --redis 127.0.0.1:$redis_port "$work/keys1k.json" >"$work/import.log" 2>&1 ||
	{ cat "$work/import.log" >&2; exit 1; }
say "redis: $(tail -1 "$work/import.log")"

# --- Two Caddy processes, a site per configuration: the sites with the 1M
# keys in one (with a plain site of its own, their reference), the others
# in the other. The collector marks a process's whole heap every cycle; in
# one process the million keys' marking (a fifth of the CPU) would land on
# whichever row runs during a cycle, and 2-s runs get one cycle or none.
# name port directives...
sites=() declare -A port body
add_site() { sites+=("$1"); port[$1]=$2; body[$1]=$3; }
# in1m site: whether the site is served by the 1M-key process.
in1m() { case $1 in k1m* | plain1m) return 0 ;; esac; return 1; }
rcfg="redis {
			address 127.0.0.1:$redis_port
		}"
add_site plain 18100 ''
add_site plain1m 18118 ''
add_site k1k 18102 "api_key {
		max_failures off
		keys_file $work/keys1k.json
	}"
add_site k1m 18104 "api_key {
		max_failures off
		keys_file $work/keys1m.json
	}"
add_site k1m-rate 18114 "api_key {
		max_failures off
		keys_file $work/keys1m.json
		rate 1000000000/1s
	}"
add_site prefixed 18116 "api_key {
		max_failures off
		keys_file $work/keys1k.json
		prefix sk
	}"
add_site rate 18106 "api_key {
		max_failures off
		keys_file $work/keys1k.json
		rate 1000000000/1s
	}"
add_site quota 18108 "api_key {
		max_failures off
		keys_file $work/keys1k.json
		rate 1000000000/1s
		quota 1000000000/month
		quota_file $work/quotas-PORT.db
	}"
add_site redis-limits 18110 "api_key {
		max_failures off
		keys_file $work/keys1k.json
		rate 1000000000/1s
		limits redis
		$rcfg
	}"
add_site redis-keys 18112 "api_key {
		max_failures off
		store redis
		$rcfg
	}"
# caddyfile 0|1: the Caddyfile of the sites without (0) or with (1) the
# 1M keys.
caddyfile() {
	printf '{\n\tadmin off\n\tpersist_config off\n}\n'
	# The access logs do not roll: Caddy gzips a rolled file (every 100
	# MiB) in its own process, a second or two of CPU that would land on
	# whichever row runs then.
	for s in "${sites[@]}"; do
		if in1m "$s"; then [ "$1" = 1 ] || continue; else [ "$1" = 0 ] || continue; fi
		for lg in 0 1; do
			p=$((port[$s] + lg))
			printf 'http://127.0.0.1:%d {\n' "$p"
			[ -n "${body[$s]}" ] && printf '\t%s\n' "${body[$s]//PORT/$p}"
			[ $lg = 1 ] && printf '\tlog {\n\t\toutput file %s/access-%d.log {\n\t\t\troll_disabled\n\t\t}\n\t\tformat json\n\t}\n' "$work" "$p"
			printf '\trespond "ok"\n}\n'
		done
	done
}
caddyfile 0 >"$work/Caddyfile"
caddyfile 1 >"$work/Caddyfile1m"

say "starting caddy, and a second caddy with the 1M keys"
"$work/caddy" run --config "$work/Caddyfile" >"$work/caddy.log" 2>&1 &
caddy_pid=$!; pids+=("$caddy_pid")
"$work/caddy" run --config "$work/Caddyfile1m" >"$work/caddy1m.log" 2>&1 &
caddy1m_pid=$!; pids+=("$caddy1m_pid")
key0="X-API-Key: $(head -1 "$work/plain.txt")"
for s in "${sites[@]}"; do wait_for "http://127.0.0.1:${port[$s]}/" "$key0"; wait_for "http://127.0.0.1:$((port[$s] + 1))/" "$key0"; done
say "caddy ready, RSS $(($(rss_kb $caddy_pid) / 1024)) MiB; with the 1M keys $(($(rss_kb $caddy1m_pid) / 1024)) MiB"

# --- nginx: plain, and map + limit_req with 1k keys; 1M keys in a second
# instance, so that a slow or failed load leaves the first one running.
nginx_pids=() nginx1m_pids=()
nginx_conf() { # file, pid, servers...
	local f=$1 pidf=$2; shift 2
	cat >"$f" <<NGX
worker_processes 2;
pid $pidf;
error_log $work/nginx-error.log warn;
events { worker_connections 1024; }
http {
	access_log off;
	map_hash_max_size 4194304;
	map_hash_bucket_size 128;
	$*
}
NGX
}
nginx_kb() { local s=0 p; for p in "$@"; do s=$((s + $(rss_kb "$p"))); done; echo $s; }
if [ $have_nginx = 1 ]; then
	nginx_conf "$work/nginx.conf" "$work/nginx.pid" "
	map \$http_x_api_key \$key_id { default \"\"; include $work/map1k.conf; }
	limit_req_zone \$key_id zone=keys1k:16m rate=100000000r/s;
	log_format apikey escape=json '{\"ts\":\"\$time_iso8601\",\"status\":\$status,\"uri\":\"\$request_uri\",\"key_id\":\"\$key_id\",\"bytes\":\$body_bytes_sent,\"duration\":\$request_time}';
	server { listen 127.0.0.1:18200; location / { empty_gif; } }
	server { listen 127.0.0.1:18201; location / {
		if (\$key_id = \"\") { return 401; }
		limit_req zone=keys1k burst=1000000 nodelay;
		empty_gif;
	} }
	server { listen 127.0.0.1:18203; access_log $work/nginx-access-18203.log apikey; location / { empty_gif; } }
	server { listen 127.0.0.1:18204; access_log $work/nginx-access-18204.log apikey; location / {
		if (\$key_id = \"\") { return 401; }
		limit_req zone=keys1k burst=1000000 nodelay;
		empty_gif;
	} }"
	nginx_conf "$work/nginx1m.conf" "$work/nginx1m.pid" "
	map \$http_x_api_key \$key_id { default \"\"; include $work/map1m.conf; }
	limit_req_zone \$key_id zone=keys1m:64m rate=100000000r/s;
	server { listen 127.0.0.1:18202; location / {
		if (\$key_id = \"\") { return 401; }
		limit_req zone=keys1m burst=1000000 nodelay;
		empty_gif;
	} }"
	nginx -c "$work/nginx.conf" -g 'daemon off;' 2>>"$work/nginx-error.log" &
	pids+=("$!")
	wait_for http://127.0.0.1:18201/ "$key0"
	nginx_pids=($(pgrep -P "$!") "$!")
	ns=$(date +%s.%N)
	nginx -c "$work/nginx1m.conf" -g 'daemon off;' 2>>"$work/nginx-error.log" &
	pids+=("$!")
	if wait_for http://127.0.0.1:18202/ "$key0"; then
		nginx1m_pids=($(pgrep -P "$!") "$!")
		say "nginx 1M map loaded in $(awk -v a="$ns" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b-a}') s, RSS $(($(nginx_kb "${nginx1m_pids[@]}") / 1024)) MiB (all processes)"
	fi
fi

# --- The rows: name, url, lua script, plaintext keys, pids whose CPU counts,
# reference row for the ratio.
rows=() declare -A url script keysf cpupids ref
add_row() { rows+=("$1"); url[$1]=$2; script[$1]=$3; keysf[$1]=$4; cpupids[$1]=$5; ref[$1]=$6; }
for s in "${sites[@]}"; do
	kf=$work/plain.txt cpu="$caddy_pid $redis_pid" rf=plain
	if in1m "$s"; then kf=$work/plain1m.txt cpu=$caddy1m_pid rf=plain1m; fi
	add_row "$s" "http://127.0.0.1:${port[$s]}/" zipf "$kf" "$cpu" $rf
	# prefixed is there as the reference of invalid-prefixed only.
	[ "$s" = prefixed ] && continue
	add_row "$s+log" "http://127.0.0.1:$((port[$s] + 1))/" zipf "$kf" "$cpu" $rf+log
done
add_row invalid "http://127.0.0.1:${port[k1k]}/" random "$work/plain.txt" "$caddy_pid $redis_pid" k1k
# Made-up keys in the format of a declared prefix: the checksum turns them
# away before any hashing or lookup. Reference: valid keys on that site.
add_row invalid-prefixed "http://127.0.0.1:${port[prefixed]}/" random "$work/plain.txt" "$caddy_pid $redis_pid" prefixed
if [ ${#nginx_pids[@]} -gt 0 ]; then
	add_row nginx "http://127.0.0.1:18200/" zipf "$work/plain.txt" "${nginx_pids[*]}" nginx
	add_row nginx-map1k "http://127.0.0.1:18201/" zipf "$work/plain.txt" "${nginx_pids[*]}" nginx
	add_row nginx+log "http://127.0.0.1:18203/" zipf "$work/plain.txt" "${nginx_pids[*]}" nginx+log
	add_row nginx-map1k+log "http://127.0.0.1:18204/" zipf "$work/plain.txt" "${nginx_pids[*]}" nginx+log
fi
[ ${#nginx1m_pids[@]} -gt 0 ] &&
	add_row nginx-map1m "http://127.0.0.1:18202/" zipf "$work/plain1m.txt" "${nginx1m_pids[*]}" nginx

# to_us value-with-unit: wrk's latency in microseconds.
to_us() { awk -v v="$1" 'BEGIN { n = v + 0; u = v; sub(/^[0-9.]+/, "", u);
	m = (u == "us") ? 1 : (u == "ms") ? 1000 : (u == "s") ? 1000000 : 1; printf "%.0f", n * m }'; }
# drive row secs: runs wrk and prints "rps p50us p99us requests bad cputicks".
drive() {
	local r=$1 d=$2 out c0 c1
	c0=$(cpu_ticks ${cpupids[$r]})
	local prefix=rnd-
	[ "$r" = invalid-prefixed ] && prefix=sk_
	out=$(PREFIX=$prefix KEYS_FILE=${keysf[$r]} wrk -t1 -c$conns -d"${d}s" --latency -s "$work/${script[$r]}.lua" "${url[$r]}")
	c1=$(cpu_ticks ${cpupids[$r]})
	echo "$out" >>"$work/wrk-$r.log"
	local rps p50 p99 reqs bad
	rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
	p50=$(to_us "$(awk '$1 == "50%" {print $2}' <<<"$out")")
	p99=$(to_us "$(awk '$1 == "99%" {print $2}' <<<"$out")")
	reqs=$(awk '/requests in/ {print $1}' <<<"$out")
	bad=$(awk '/Non-2xx/ {n += $NF} /Socket errors/ {gsub(/[^0-9 ]/, " "); n += $1 + $2 + $3 + $4} END {print n + 0}' <<<"$out")
	echo "$rps $p50 $p99 $reqs $bad $((c1 - c0))"
}

# Each row runs in pairs with its reference, back to back, and its ratio
# is the median of the pairs' ratios: a shared machine's load drifts over
# minutes, and two runs seconds apart see nearly the same. The reference
# goes first in every other pair, and from round to round each pair swaps
# its order; the next round also takes the rows the other way round. A
# reference runs once per pair it is in, so it has the most runs.
declare -A res pairs
say "driving ${#rows[@]} rows in pairs with their references: $rounds round(s) of ${secs} s per run, wrk -t1 -c$conns"
order=()
for row in "${rows[@]}"; do [ "${ref[$row]}" = "$row" ] || order+=("$row"); done
for r in $(seq "$rounds"); do
	k=0
	for row in "${order[@]}"; do
		rf=${ref[$row]} k=$((k + 1))
		if (((r + k) % 2)); then
			a=$(drive "$rf" "$secs"); b=$(drive "$row" "$secs")
		else
			b=$(drive "$row" "$secs"); a=$(drive "$rf" "$secs")
		fi
		res[$rf]+="$a"$'\n' res[$row]+="$b"$'\n'
		pairs[$row]+="$(awk -v x="${b%% *}" -v y="${a%% *}" 'BEGIN {printf "%.4f", (y > 0) ? x / y : 0}')"$'\n'
	done
	for ((i = 0, j = ${#order[@]} - 1; i < j; i++, j--)); do t=${order[i]}; order[i]=${order[j]}; order[j]=$t; done
	say "round $r done"
done

med() { sort -n | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
col() { awk -v c="$2" 'NF {print $c}' <<<"${res[$1]}"; }

echo
echo "Machine: $(nproc) cores, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo); $(date -u +%Y-%m-%d); $(go version | cut -d' ' -f3)"
echo "wrk -t1 -c$conns, runs of ${secs} s, each row in $rounds pair(s) with its reference; req/s, p50, p99: medians of the row's runs. CPU: server µs per request over all its runs (Caddy + Redis, or all nginx processes)."
echo "Ratio: median of the row's req/s over its reference's in each pair, the pairs' lowest and highest beside it (reference: plain for no log, plain+log with a log, plain1m and plain1m+log for the 1M-key rows (the same site in their process), k1k for invalid keys, prefixed for invalid-prefixed, nginx or nginx+log for nginx rows)."
echo
printf '| %-18s | %9s | %7s | %7s | %8s | %6s | %-11s | %6s | %-13s |\n' site 'req/s' 'p50 µs' 'p99 µs' 'CPU µs' 'errors' ref ratio 'pairs'
printf '| %s | %s: | %s: | %s: | %s: | %s: | %s | %s: | %s |\n' ----------------- -------- ------ ------ ------- ----- ----------- ----- -------------
for row in "${rows[@]}"; do
	rps=$(col "$row" 1 | med) p50=$(col "$row" 2 | med) p99=$(col "$row" 3 | med)
	reqs=$(col "$row" 4 | awk '{s += $1} END {print s}')
	bad=$(col "$row" 5 | awk '{s += $1} END {print s}')
	ticks=$(col "$row" 6 | awk '{s += $1} END {print s}')
	cpu=$(awk -v t="$ticks" -v n="$reqs" -v hz="$hz" 'BEGIN {printf "%.1f", t / hz * 1e6 / n}')
	if [ "${ref[$row]}" = "$row" ]; then
		ratio=1.000 span="reference"
	else
		ratio=$(awk 'NF' <<<"${pairs[$row]}" | med | awk '{printf "%.3f", $1}')
		span=$(awk 'NF' <<<"${pairs[$row]}" | sort -n | awk 'NR == 1 {lo = $1} {hi = $1} END {printf "%.3f–%.3f", lo, hi}')
	fi
	case $row in invalid*) ;; *) [ "$bad" = 0 ] || bad="$bad!" ;; esac
	printf '| %-18s | %9.0f | %7s | %7s | %8s | %6s | %-11s | %6s | %-13s |\n' "$row" "$rps" "$p50" "$p99" "$cpu" "$bad" "${ref[$row]}" "$ratio" "$span"
done

# --- Reload of the 1M keys file under load: a steady run, then a run
# during which the file is replaced (by one with a key more) and reloaded.
say "reload under load"
rsecs=$((smoke ? 6 : 20))
steady=$(drive k1m "$rsecs")
loaded_before=$(grep -c 'keys file reloaded' "$work/caddy1m.log" || true)
(sleep $((rsecs / 3)); cp "$work/keys1m-b.json" "$work/keys1m.tmp" && mv "$work/keys1m.tmp" "$work/keys1m.json") &
during=$(drive k1m "$rsecs")
wait $!
# A reload that outlasts the run still counts; wait for it.
for _ in $(seq 60); do [ "$(grep -c 'keys file reloaded' "$work/caddy1m.log" || true)" -gt "$loaded_before" ] && break; sleep 0.5; done
reloads=$(($(grep -c 'keys file reloaded' "$work/caddy1m.log" || true) - loaded_before))
read -r _ _ sp99 _ _ _ <<<"$steady"
read -r drps _ dp99 dreqs dbad _ <<<"$during"
echo
echo "Reload of the 1M keys file under load (k1m, ${rsecs} s runs): steady p99 ${sp99} µs; with a reload p99 ${dp99} µs ($(awk -v a="$dp99" -v b="$sp99" 'BEGIN {printf "%.2f", a / b}')×), $dreqs requests, $dbad errors or non-2xx; reloads seen in the log: $reloads"

# --- Load time and memory of 1M keys: a Caddy with one 1k site, then one
# with one 1M site; the RSS difference over the 999,000 extra keys.
say "load time and memory"
one_site() { # keysfile port -> prints "seconds rss_kb"
	printf '{\n\tadmin off\n\tpersist_config off\n}\nhttp://127.0.0.1:%d {\n\tapi_key {\n\t\tkeys_file %s\n\t}\n\trespond "ok"\n}\n' "$2" "$1" >"$work/one.Caddyfile"
	local s e p
	s=$(date +%s.%N)
	"$work/caddy" run --config "$work/one.Caddyfile" >"$work/one.log" 2>&1 &
	p=$!
	wait_for "http://127.0.0.1:$2/" "$key0" || { kill $p; return 1; }
	e=$(date +%s.%N)
	sleep 1
	echo "$(awk -v a="$s" -v b="$e" 'BEGIN {printf "%.2f", b - a}') $(rss_kb $p)"
	kill $p; wait $p 2>/dev/null || true
}
kill "$caddy_pid" "$caddy1m_pid"; wait "$caddy_pid" "$caddy1m_pid" 2>/dev/null || true
read -r t1k r1k <<<"$(one_site "$work/keys1k.json" 18300)"
read -r t1m r1m <<<"$(one_site "$work/keys1m-b.json" 18301)"
echo "Start to first 200: 1k keys ${t1k} s, 1M keys ${t1m} s (includes process start; the 1M file is $(($(stat -c %s "$work/keys1m-b.json") / 1048576)) MiB)."
echo "RSS: 1k keys $((r1k / 1024)) MiB, 1M keys $((r1m / 1024)) MiB: $(awk -v a="$r1k" -v b="$r1m" 'BEGIN {printf "%.0f", (b - a) * 1024 / 999001}') B per key (RSS includes garbage not yet returned to the OS)."
say "done"
