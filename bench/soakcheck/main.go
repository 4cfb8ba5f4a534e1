// Command soakcheck is the Go half of bench/soak.sh: it makes the soak's
// keys, finds free loopback ports, and checks the JSON access logs of a
// soak run against the invariants the script asserts.
//
//	soakcheck keys -dir DIR -suffix S -churn N -stable N -redis N -probe-rate 5/1h
//	soakcheck ports N
//	soakcheck file -log access.log -writes writes.log -window W -bound 5s -probe-limit 5
//	soakcheck redis -log access.log -down T -up T -settle 3s
//
// The keys are derived from their kind and index (soak-stable-3-S,
// soak-churn-17-S, soak-probe-S, soak-redis-2-S), so wrk's Lua script
// makes them without a list. The request path says which key a request
// carried (/s/3, /c/17, /p, /v/2; /x an invalid key, /m none), so that
// a refused request, which the log cannot name by key id, is still
// known.
package main

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"math"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	var err error
	switch os.Args[1] {
	case "keys":
		err = cmdKeys(os.Args[2:])
	case "ports":
		err = cmdPorts(os.Args[2:])
	case "file":
		err = cmdFile(os.Args[2:])
	case "redis":
		err = cmdRedis(os.Args[2:])
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "soakcheck:", err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: soakcheck keys|ports|file|redis [flags] (see the doc comment)")
	os.Exit(2)
}

func hashOf(key string) string {
	sum := sha256.Sum256([]byte(key))
	return "sha256:" + hex.EncodeToString(sum[:])
}

// cmdKeys writes the key material of a run into dir:
//
//   - churn.jsonl: line i+1 is the keys-file entry of churn key i (id
//     c<i>), with a trailing comma, so that any range of lines can be
//     pasted into the keys array;
//   - fixed.jsonl: the stable keys (ids s<i>), with trailing commas, and
//     last the probe key (id probe, its own small rate), without one;
//   - redis-keys.json: a keys file of the Redis keys (ids r<i>), for
//     caddy api-key import;
//   - probe.txt: the probe key itself, for curl.
func cmdKeys(args []string) error {
	fs := flag.NewFlagSet("keys", flag.ExitOnError)
	dir := fs.String("dir", "", "where to write the files")
	suffix := fs.String("suffix", "", "the secret part every key ends with")
	churn := fs.Int("churn", 600, "churn keys")
	stable := fs.Int("stable", 8, "stable keys")
	rds := fs.Int("redis", 8, "keys for the Redis site")
	probeRate := fs.String("probe-rate", "5/1h", "the probe key's own rate")
	fs.Parse(args)
	if *dir == "" || *suffix == "" {
		return fmt.Errorf("keys: -dir and -suffix are required")
	}
	entry := func(id, key, extra string) string {
		return fmt.Sprintf(`{"id": %q, "hash": %q%s}`, id, hashOf(key), extra)
	}
	var b strings.Builder
	for i := range *churn {
		b.WriteString(entry(fmt.Sprintf("c%d", i), fmt.Sprintf("soak-churn-%d-%s", i, *suffix), "") + ",\n")
	}
	if err := os.WriteFile(filepath.Join(*dir, "churn.jsonl"), []byte(b.String()), 0o600); err != nil {
		return err
	}
	b.Reset()
	for i := range *stable {
		b.WriteString(entry(fmt.Sprintf("s%d", i), fmt.Sprintf("soak-stable-%d-%s", i, *suffix), "") + ",\n")
	}
	probe := "soak-probe-" + *suffix
	b.WriteString(entry("probe", probe, fmt.Sprintf(`, "rate": %q`, *probeRate)) + "\n")
	if err := os.WriteFile(filepath.Join(*dir, "fixed.jsonl"), []byte(b.String()), 0o600); err != nil {
		return err
	}
	b.Reset()
	b.WriteString(`{"keys": [` + "\n")
	for i := range *rds {
		if i > 0 {
			b.WriteString(",\n")
		}
		b.WriteString(entry(fmt.Sprintf("r%d", i), fmt.Sprintf("soak-redis-%d-%s", i, *suffix), ""))
	}
	b.WriteString("\n]}\n")
	if err := os.WriteFile(filepath.Join(*dir, "redis-keys.json"), []byte(b.String()), 0o600); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(*dir, "probe.txt"), []byte(probe+"\n"), 0o600)
}

// cmdPorts prints n free loopback ports, all held open until all are
// found, so that they differ.
func cmdPorts(args []string) error {
	n := 1
	if len(args) > 0 {
		var err error
		if n, err = strconv.Atoi(args[0]); err != nil || n < 1 {
			return fmt.Errorf("ports: %q is not a count", args[0])
		}
	}
	var ports []string
	for range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return err
		}
		defer ln.Close()
		ports = append(ports, strconv.Itoa(ln.Addr().(*net.TCPAddr).Port))
	}
	fmt.Println(strings.Join(ports, " "))
	return nil
}

// entry is the part of a Caddy access-log line that the checks read.
type entry struct {
	TS       float64 `json:"ts"`
	Duration float64 `json:"duration"`
	Status   int     `json:"status"`
	Request  struct {
		URI string `json:"uri"`
	} `json:"request"`
	APIKey struct {
		ID       string `json:"id"`
		Outcome  string `json:"outcome"`
		Degraded string `json:"degraded"`
	} `json:"api_key"`
}

// start is when the request began: the log line is written when it ends.
func (e *entry) start() float64 { return e.TS - e.Duration }

// readLog reads the access log; a last line without its newline (still
// being written) is left out.
func readLog(path string) ([]entry, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []entry
	r := bufio.NewReaderSize(f, 1<<20)
	for n := 1; ; n++ {
		line, err := r.ReadBytes('\n')
		if err != nil {
			break // io.EOF; a partial line is dropped
		}
		var e entry
		if err := json.Unmarshal(line, &e); err != nil {
			return nil, fmt.Errorf("%s:%d: %v", path, n, err)
		}
		if e.Request.URI == "" {
			continue // not an access-log line
		}
		out = append(out, e)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].TS < out[j].TS })
	return out, nil
}

// violations collects failed invariants by kind, with a few examples of
// each.
type violations struct {
	order    []string
	count    map[string]int
	examples map[string][]string
}

func (v *violations) add(kind, format string, args ...any) {
	if v.count == nil {
		v.count, v.examples = map[string]int{}, map[string][]string{}
	}
	if v.count[kind] == 0 {
		v.order = append(v.order, kind)
	}
	v.count[kind]++
	if len(v.examples[kind]) < 5 {
		v.examples[kind] = append(v.examples[kind], fmt.Sprintf(format, args...))
	}
}

// report prints the violations and returns an error if there were any.
func (v *violations) report() error {
	if len(v.order) == 0 {
		fmt.Println("  violations: none")
		return nil
	}
	for _, k := range v.order {
		fmt.Printf("  VIOLATION %s: %d, e.g.\n", k, v.count[k])
		for _, ex := range v.examples[k] {
			fmt.Println("    " + ex)
		}
	}
	return fmt.Errorf("%d kinds of violation", len(v.order))
}

// longestGap is the longest time between two consecutive requests
// logged from from to to, and when it began: a stall of the server (or
// of the machine) under load shows there.
func longestGap(entries []entry, from, to float64) (gap, at float64) {
	prev := math.NaN()
	for i := range entries {
		ts := entries[i].TS
		if ts < from || ts > to {
			continue
		}
		if d := ts - prev; d > gap {
			gap, at = d, prev
		}
		prev = ts
	}
	return gap, at
}

func clock(ts float64) string { return time.Unix(0, int64(ts*1e9)).UTC().Format("15:04:05.000") }

// desc is one log line, shortly, for an example.
func desc(e *entry) string {
	s := fmt.Sprintf("%s %s status %d outcome %q", clock(e.TS), e.Request.URI, e.Status, e.APIKey.Outcome)
	if e.APIKey.Degraded != "" {
		s += fmt.Sprintf(" degraded %q", e.APIKey.Degraded)
	}
	return s
}

// kindOf splits a request path into the kind of key and its index.
func kindOf(uri string) (kind string, index int) {
	if i := strings.IndexByte(uri, '?'); i >= 0 {
		uri = uri[:i]
	}
	parts := strings.Split(strings.TrimPrefix(uri, "/"), "/")
	if len(parts) == 2 {
		if n, err := strconv.Atoi(parts[1]); err == nil && n >= 0 {
			return parts[0], n
		}
	}
	return parts[0], -1
}

// tally counts log lines by outcome (with the degraded mode) and status
// class, for the summary.
type tally struct {
	outcomes map[string]int
	classes  [6]int
}

func (t *tally) add(e *entry) {
	if t.outcomes == nil {
		t.outcomes = map[string]int{}
	}
	o := e.APIKey.Outcome
	if o == "" {
		o = "(none)"
	}
	if e.APIKey.Degraded != "" {
		o += "+" + e.APIKey.Degraded
	}
	t.outcomes[o]++
	if c := e.Status / 100; c >= 1 && c <= 5 {
		t.classes[c]++
	}
}

func (t *tally) String() string {
	var keys []string
	for k := range t.outcomes {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var parts []string
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s %d", k, t.outcomes[k]))
	}
	return fmt.Sprintf("2xx %d, 4xx %d, 5xx %d; outcomes: %s", t.classes[2], t.classes[4], t.classes[5], strings.Join(parts, ", "))
}

// write is one rewrite of the keys file: just before the rename and
// just after it.
type write struct{ before, after float64 }

// readWrites reads the rewrite loop's record: "<gen> <before> <after>"
// per line, unix seconds.
func readWrites(path string) (map[int]write, int, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, 0, err
	}
	out, last := map[int]write{}, -1
	for n, line := range strings.Split(strings.TrimSpace(string(data)), "\n") {
		f := strings.Fields(line)
		if len(f) != 3 {
			return nil, 0, fmt.Errorf("%s:%d: want <gen> <before> <after>, got %q", path, n+1, line)
		}
		g, err1 := strconv.Atoi(f[0])
		b, err2 := strconv.ParseFloat(f[1], 64)
		a, err3 := strconv.ParseFloat(f[2], 64)
		if err1 != nil || err2 != nil || err3 != nil {
			return nil, 0, fmt.Errorf("%s:%d: bad line %q", path, n+1, line)
		}
		out[g] = write{b, a}
		last = max(last, g)
	}
	return out, last, nil
}

// cmdFile checks the keys-file site's log. Write g of the keys file holds
// churn keys g to g+window-1, so churn key i is added by write
// max(0, i-window+1) and removed by write i+1. With bound the documented
// time from a write to its effect:
//
//   - no 5xx;
//   - a churn key is never admitted before its write, nor in a request
//     that starts more than bound after its removal, and always admitted
//     from bound after its addition until its removal;
//   - stable keys are always admitted, invalid keys always invalid,
//     requests without a key always missing;
//   - the probe key (its own small rate) is admitted exactly probe-limit
//     times in the whole run, reloads notwithstanding.
func cmdFile(args []string) error {
	fs := flag.NewFlagSet("file", flag.ExitOnError)
	logPath := fs.String("log", "", "access log of the keys-file site")
	writesPath := fs.String("writes", "", "the rewrite loop's record")
	window := fs.Int("window", 40, "churn keys in each version of the file")
	bound := fs.Duration("bound", 5*time.Second, "documented time from a write of the keys file to its effect")
	probeLimit := fs.Int("probe-limit", 5, "the probe key's burst")
	fs.Parse(args)
	entries, err := readLog(*logPath)
	if err != nil {
		return err
	}
	writes, last, err := readWrites(*writesPath)
	if err != nil {
		return err
	}
	inf := math.Inf(1)
	at := func(g int) write {
		if w, ok := writes[g]; ok {
			return w
		}
		return write{inf, inf}
	}
	b := bound.Seconds()
	var v violations
	var all tally
	var afterRemoval, mustAdmit, probeOK int
	var maxAdmitLag, maxRefuseLag float64 // after removal; after addition
	for i := range entries {
		e := &entries[i]
		all.add(e)
		if e.Status >= 500 {
			v.add("5xx", "%s", desc(e))
		}
		kind, idx := kindOf(e.Request.URI)
		ok := e.APIKey.Outcome == "ok"
		switch kind {
		case "c":
			added, removed := at(max(0, idx-*window+1)), at(idx+1)
			s := e.start()
			switch {
			case ok && e.TS < added.before:
				v.add("admitted before it was added", "%s (added %.3f s later)", desc(e), added.before-e.TS)
			case ok && s > removed.after+b:
				v.add("admitted after the removal bound", "%s, %.3f s after its removal", desc(e), s-removed.after)
			case !ok && s >= added.after+b && e.TS < removed.before:
				v.add("refused after the addition bound", "%s, %.3f s after its addition", desc(e), s-added.after)
			case !ok && e.APIKey.Outcome != "invalid":
				v.add("churn key: unexpected outcome", "%s", desc(e))
			}
			if ok && s > removed.after {
				maxAdmitLag = max(maxAdmitLag, s-removed.after)
			}
			if !ok && s >= added.after && e.TS < removed.before {
				maxRefuseLag = max(maxRefuseLag, s-added.after)
			}
			if s > removed.after+b {
				afterRemoval++
			}
			if s >= added.after+b && e.TS < removed.before {
				mustAdmit++
			}
		case "s":
			if !ok || e.Status != 200 {
				v.add("stable key refused", "%s", desc(e))
			}
		case "x":
			if e.APIKey.Outcome != "invalid" || e.Status != 401 {
				v.add("invalid key not refused as invalid", "%s", desc(e))
			}
		case "m":
			if e.APIKey.Outcome != "missing" || e.Status != 401 {
				v.add("request without a key not refused as missing", "%s", desc(e))
			}
		case "p":
			if ok {
				probeOK++
				if probeOK > *probeLimit {
					v.add("probe admitted over its limit", "%s (admission %d)", desc(e), probeOK)
				}
			} else if e.APIKey.Outcome != "rate_limited" || e.Status != 429 {
				v.add("probe: unexpected outcome", "%s", desc(e))
			}
		}
	}
	if probeOK != *probeLimit {
		v.add("probe admissions", "%d in the run, want exactly %d", probeOK, *probeLimit)
	}
	if afterRemoval == 0 {
		v.add("removal bound not exercised", "no request with a churn key started more than %v after its removal", *bound)
	}
	if mustAdmit == 0 {
		v.add("addition bound not exercised", "no request with a churn key started more than %v after its addition", *bound)
	}
	span := 0.0
	if len(entries) > 1 {
		span = entries[len(entries)-1].TS - entries[0].TS
	}
	fmt.Printf("keys-file site: %d requests logged over %.1f s; %s\n", len(entries), span, all.String())
	fmt.Printf("  keys file: %d rewrites; churn requests more than %v after their key's removal: %d (all must be refused); within [addition+%v, removal): %d (all must be admitted)\n",
		last, *bound, afterRemoval, *bound, mustAdmit)
	fmt.Printf("  observed: a removed key admitted at most %.3f s after its removal, an added key refused at most %.3f s after its addition (bound %v)\n",
		maxAdmitLag, maxRefuseLag, *bound)
	fmt.Printf("  probe key: admitted %d times in the run (its burst: %d)\n", probeOK, *probeLimit)
	gap, gapAt := longestGap(entries, writes[1].before, writes[last].after)
	fmt.Printf("  longest time without a logged request during the rewrites: %.2f s, from %s\n", gap, clock(gapAt))
	return v.report()
}

// cmdRedis checks the Redis site's log around an outage of Redis from
// down to up, with on_store_error allow_cached and on_limiter_error
// local. Those modes also answer a single command that fails (a
// timeout on a busy machine) outside an outage, so their outcomes are
// allowed throughout; what must hold:
//
//   - no 5xx;
//   - a valid key is admitted, not degraded or degraded local_limits or
//     cached_key, or refused store_unavailable (a cache miss while Redis
//     is away); never limiter_unavailable nor degraded unlimited, the
//     outcomes of other modes;
//   - during the outage (until settle after it) at least
//     min-degraded-share of the valid requests are admitted degraded:
//     the keys were cached, and cached keys keep working;
//   - before and after it at least min-normal-share of them are admitted
//     and not degraded: normal service, and normal service restored;
//   - an invalid key is never admitted; no key is always missing.
func cmdRedis(args []string) error {
	fs := flag.NewFlagSet("redis", flag.ExitOnError)
	logPath := fs.String("log", "", "access log of the Redis site")
	down := fs.Float64("down", 0, "when redis-server was killed (unix seconds)")
	up := fs.Float64("up", 0, "when it answered again (unix seconds)")
	settle := fs.Duration("settle", 3*time.Second, "how long after up counts as the outage's")
	minDegraded := fs.Float64("min-degraded-share", 0.5, "least share of valid requests admitted degraded during the outage")
	minNormal := fs.Float64("min-normal-share", 0.9, "least share of valid requests admitted, not degraded, before and after the outage")
	fs.Parse(args)
	entries, err := readLog(*logPath)
	if err != nil {
		return err
	}
	if *down == 0 || *up <= *down {
		return fmt.Errorf("redis: -down and -up (after it) are required")
	}
	end := *up + settle.Seconds()
	const (
		before = iota
		outage
		after
	)
	names := [3]string{"before the outage", "during the outage", "after the outage"}
	var v violations
	var all tally
	var phases [3]tally
	var valid, normal, degraded, unavailable [3]int
	for i := range entries {
		e := &entries[i]
		all.add(e)
		if e.Status >= 500 {
			v.add("5xx", "%s", desc(e))
		}
		// A request in flight when Redis went away or came back counts
		// as the outage's.
		phase := outage
		switch {
		case e.TS < *down:
			phase = before
		case e.start() >= end:
			phase = after
		}
		phases[phase].add(e)
		kind, _ := kindOf(e.Request.URI)
		o, d := e.APIKey.Outcome, e.APIKey.Degraded
		switch kind {
		case "v":
			valid[phase]++
			switch {
			case o == "ok" && d == "":
				normal[phase]++
			case o == "ok" && (d == "local_limits" || d == "cached_key"):
				degraded[phase]++
			case o == "store_unavailable" && e.Status == 401:
				unavailable[phase]++
			default:
				v.add("valid key: an answer of another mode, or none", "%s (%s)", desc(e), names[phase])
			}
		case "x":
			if o == "ok" {
				v.add("invalid key admitted", "%s", desc(e))
			} else if o != "invalid" && o != "store_unavailable" {
				v.add("invalid key: unexpected outcome", "%s", desc(e))
			}
		case "m":
			if o != "missing" || e.Status != 401 {
				v.add("request without a key not refused as missing", "%s", desc(e))
			}
		}
	}
	share := func(n, of int) float64 {
		if of == 0 {
			return 0
		}
		return float64(n) / float64(of)
	}
	if s := share(degraded[outage], valid[outage]); s < *minDegraded {
		v.add("failure mode not seen", "%d of %d valid requests during the outage admitted degraded (%.1f%%), want at least %.0f%%",
			degraded[outage], valid[outage], 100*s, 100**minDegraded)
	}
	for _, p := range []int{before, after} {
		if valid[p] < 100 {
			v.add("too few requests "+names[p], "%d valid requests, want at least 100", valid[p])
		} else if s := share(normal[p], valid[p]); s < *minNormal {
			v.add("not normal service "+names[p], "%d of %d valid requests admitted and not degraded (%.1f%%), want at least %.0f%%",
				normal[p], valid[p], 100*s, 100**minNormal)
		}
	}
	fmt.Printf("Redis site: %d requests logged; %s\n", len(entries), all.String())
	fmt.Printf("  redis-server down for %.1f s; the outage counts until %v after it is back\n", *up-*down, *settle)
	gap, gapAt := longestGap(entries, math.Inf(-1), math.Inf(1))
	fmt.Printf("  longest time without a logged request: %.2f s, from %s\n", gap, clock(gapAt))
	for p, name := range names {
		fmt.Printf("  %s: %s\n", name, phases[p].String())
		fmt.Printf("    valid keys: %d requests, %d admitted (%.1f%%), %d admitted degraded (%.1f%%), %d refused store_unavailable (%.1f%%)\n",
			valid[p], normal[p], 100*share(normal[p], valid[p]), degraded[p], 100*share(degraded[p], valid[p]),
			unavailable[p], 100*share(unavailable[p], valid[p]))
	}
	return v.report()
}
