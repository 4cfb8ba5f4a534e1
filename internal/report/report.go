// Package report sums up Caddy's JSON access logs per API key, owner,
// plan, status or path, as `caddy api-key report` prints them. It reads a
// log as a stream: its memory grows with the number of groups, never with
// the number of lines.
package report

import (
	"bufio"
	"bytes"
	"cmp"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
	"strconv"
	"strings"
	"time"
)

// By is what a report groups requests by.
type By string

// The groupings.
const (
	ByKey    By = "key"    // the api_key field's id
	ByOwner  By = "owner"  // the owner of that key, from a keys file
	ByPlan   By = "plan"   // the api_key field's plan
	ByStatus By = "status" // the response status
	ByPath   By = "path"   // the request path, without the query string
)

// Groupings lists the values of By, in the order help texts give them.
var Groupings = []By{ByKey, ByOwner, ByPlan, ByStatus, ByPath}

// Names of the groups that hold what has no name of its own.
const (
	NoneGroup    = "(none)"     // no key id (missing or invalid key), no plan, or no status
	UnknownGroup = "(unknown)"  // ByOwner: a key id that Owners does not have
	NoOwnerGroup = "(no owner)" // ByOwner: a key that has no owner
	OtherGroup   = "(other)"    // ByPath: the paths past MaxPaths
)

// DefaultMaxPaths is how many distinct paths ByPath keeps apart by default.
const DefaultMaxPaths = 10000

// maxLine is the longest line read; a longer one is skipped (and counted),
// so that one broken line cannot take the memory of the whole file.
const maxLine = 4 << 20

// Options say which access-log entries a report counts and how it groups
// them.
type Options struct {
	// By is the grouping. Default: ByKey.
	By By
	// Key keeps only the entries of this key id.
	Key string
	// Owner keeps only the entries of keys that Owners gives this owner.
	Owner string
	// Owners maps key ids to their owners: the access log names a key
	// by id only. ByOwner and Owner need it.
	Owners map[string]string
	// Since and Until keep only the entries with Since <= ts < Until;
	// a zero time is no bound. With either, an entry without a ts is
	// left out.
	Since, Until time.Time
	// Lines, if not nil, gets each entry that passes the filters, as the
	// raw line it was read from, and nothing is summed up.
	Lines io.Writer
	// MaxPaths caps the distinct paths of ByPath; the requests for any
	// further path are counted in OtherGroup. Default: DefaultMaxPaths.
	MaxPaths int
}

// Stats count the lines a report read.
type Stats struct {
	Lines   int64 // lines read, not counting empty ones
	Entries int64 // access-log entries among them
	Matched int64 // entries that passed the filters
	// Skipped are the lines that are not access-log entries: not JSON,
	// JSON that is not a Caddy log entry, or longer than 4 MiB.
	Skipped int64
	// OtherLoggers are Caddy log entries of other loggers (or of an
	// access logger, but not about a request); they are not reported.
	OtherLoggers int64
	// FirstSkipped is where the first skipped line is: "name:line".
	FirstSkipped string
}

// Row is one group of a report.
type Row struct {
	Group    string
	Requests int64
	// Share is the group's percentage of the report's requests.
	Share                           float64
	Status2xx, Status4xx, Status5xx int64
	Status401, Status403, Status429 int64
	BytesOut                        int64
	// HasDuration says whether P50, P95 and P99 are known: whether any
	// of the group's entries had a duration.
	HasDuration   bool
	P50, P95, P99 time.Duration
	// FirstSeen and LastSeen are the earliest and latest ts; zero if no
	// entry had one.
	FirstSeen, LastSeen time.Time
}

// Report reads access logs and sums them up. Make one with New, give it
// the logs with Read, then take Rows and Total.
type Report struct {
	opts            Options
	since, until    float64
	hasSince        bool
	hasUntil        bool
	filterOwner     bool
	groups          map[string]*group
	byStatus        [1000]*group
	paths           int
	total           group
	stats           Stats
	e               entry
	br              *bufio.Reader
	long            []byte
	name            string
	lineNo          int64
	noneG, unknownG *group
}

// group is the running sums of a Row.
type group struct {
	name                            string
	requests                        int64
	status2xx, status4xx, status5xx int64
	status401, status403, status429 int64
	bytesOut                        int64
	first, last                     float64
	hasTS                           bool
	durations                       histogram
}

// New makes a report, checking its options.
func New(opts Options) (*Report, error) {
	if opts.By == "" {
		opts.By = ByKey
	}
	if !slices.Contains(Groupings, opts.By) {
		return nil, fmt.Errorf("unknown grouping %q: want one of %s", opts.By, groupingList())
	}
	if (opts.By == ByOwner || opts.Owner != "") && opts.Owners == nil {
		return nil, errors.New("the owners of the keys are needed to group or filter by owner")
	}
	if opts.MaxPaths <= 0 {
		opts.MaxPaths = DefaultMaxPaths
	}
	r := &Report{opts: opts, groups: make(map[string]*group), filterOwner: opts.Owner != ""}
	if !opts.Since.IsZero() {
		r.since, r.hasSince = unixSeconds(opts.Since), true
	}
	if !opts.Until.IsZero() {
		r.until, r.hasUntil = unixSeconds(opts.Until), true
	}
	if r.hasSince && r.hasUntil && r.since >= r.until {
		return nil, fmt.Errorf("the time range is empty: since %s is not before until %s",
			opts.Since.Format(time.RFC3339Nano), opts.Until.Format(time.RFC3339Nano))
	}
	return r, nil
}

func groupingList() string {
	s := make([]string, len(Groupings))
	for i, g := range Groupings {
		s[i] = string(g)
	}
	return strings.Join(s, ", ")
}

func unixSeconds(t time.Time) float64 {
	return float64(t.Unix()) + float64(t.Nanosecond())/1e9
}

// Read reads one log from rd, plain or gzip-compressed (told by its first
// bytes), line by line; name is what messages call it. An error is one of
// reading (a truncated gzip file, say) or of writing to Options.Lines;
// lines that are not access-log entries are only counted.
func (r *Report) Read(name string, rd io.Reader) error {
	if r.br == nil {
		r.br = bufio.NewReaderSize(rd, 256<<10)
	} else {
		r.br.Reset(rd)
	}
	br := r.br
	if magic, _ := br.Peek(2); len(magic) == 2 && magic[0] == 0x1f && magic[1] == 0x8b {
		zr, err := gzip.NewReader(br)
		if err != nil {
			return fmt.Errorf("reading %s: %w", name, err)
		}
		defer zr.Close()
		br = bufio.NewReaderSize(zr, 256<<10)
	}
	r.name, r.lineNo = name, 0
	long, tooLong := false, false
	for {
		chunk, err := br.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			// A line longer than the buffer: gather it, up to maxLine.
			if !long {
				long, r.long = true, r.long[:0]
			}
			if len(r.long)+len(chunk) > maxLine {
				tooLong = true
			} else if !tooLong {
				r.long = append(r.long, chunk...)
			}
			continue
		}
		line := chunk
		if long {
			if len(r.long)+len(chunk) > maxLine {
				tooLong = true
			}
			if !tooLong {
				r.long = append(r.long, chunk...)
				line = r.long
			}
		}
		if len(line) > 0 || tooLong {
			r.lineNo++
			if tooLong {
				r.skipped()
			} else if werr := r.line(line); werr != nil {
				return werr
			}
		}
		long, tooLong = false, false
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return fmt.Errorf("reading %s: %w", name, err)
		}
	}
}

func (r *Report) skipped() {
	r.stats.Lines++
	r.stats.Skipped++
	if r.stats.FirstSkipped == "" {
		r.stats.FirstSkipped = r.name + ":" + strconv.FormatInt(r.lineNo, 10)
	}
}

// line takes one line, with its line break if it has one. It returns only
// errors of writing to Options.Lines.
func (r *Report) line(line []byte) error {
	if len(bytes.TrimSpace(line)) == 0 {
		return nil
	}
	e := &r.e
	switch parseLine(line, e) {
	case kindInvalid:
		r.skipped()
		return nil
	case kindOther:
		r.stats.Lines++
		r.stats.OtherLoggers++
		return nil
	}
	r.stats.Lines++
	r.stats.Entries++
	if (r.hasSince || r.hasUntil) && (!e.hasTS || r.hasSince && e.ts < r.since || r.hasUntil && e.ts >= r.until) {
		return nil
	}
	if r.opts.Key != "" && string(e.keyID) != r.opts.Key {
		return nil
	}
	if r.filterOwner {
		if owner, ok := r.opts.Owners[string(e.keyID)]; !ok || len(e.keyID) == 0 || owner != r.opts.Owner {
			return nil
		}
	}
	r.stats.Matched++
	if r.opts.Lines != nil {
		if _, err := r.opts.Lines.Write(line); err != nil {
			return err
		}
		if line[len(line)-1] != '\n' {
			if _, err := r.opts.Lines.Write([]byte{'\n'}); err != nil {
				return err
			}
		}
		return nil
	}
	i, ok := 0, false
	if e.hasDur {
		i, ok = index(e.duration)
	}
	r.total.add(e, i, ok)
	r.groupOf(e).add(e, i, ok)
	return nil
}

// groupOf returns the group of an entry that passed the filters.
func (r *Report) groupOf(e *entry) *group {
	switch r.opts.By {
	case ByKey:
		return r.named(e.keyID, &r.noneG, NoneGroup)
	case ByPlan:
		return r.named(e.plan, &r.noneG, NoneGroup)
	case ByOwner:
		if len(e.keyID) == 0 {
			return r.lookup(&r.noneG, NoneGroup)
		}
		owner, ok := r.opts.Owners[string(e.keyID)]
		switch {
		case !ok:
			return r.lookup(&r.unknownG, UnknownGroup)
		case owner == "":
			return r.lookup(nil, NoOwnerGroup)
		}
		return r.lookup(nil, owner)
	case ByStatus:
		if e.status == 0 {
			return r.lookup(&r.noneG, NoneGroup)
		}
		g := r.byStatus[e.status]
		if g == nil {
			g = r.lookup(nil, strconv.Itoa(e.status))
			r.byStatus[e.status] = g
		}
		return g
	default: // ByPath
		path := e.uri
		if q := bytes.IndexByte(path, '?'); q >= 0 {
			path = path[:q]
		}
		if len(path) == 0 {
			return r.lookup(&r.noneG, NoneGroup)
		}
		if g := r.groups[string(path)]; g != nil {
			return g
		}
		if r.paths >= r.opts.MaxPaths {
			return r.lookup(nil, OtherGroup)
		}
		r.paths++
		return r.named(path, nil, "")
	}
}

// named returns the group called name, or the one called none (kept in
// *cache) if name is empty.
func (r *Report) named(name []byte, cache **group, none string) *group {
	if len(name) == 0 {
		return r.lookup(cache, none)
	}
	g := r.groups[string(name)]
	if g == nil {
		g = &group{name: string(name)}
		r.groups[g.name] = g
	}
	return g
}

// lookup returns the group called name, making it if need be; cache, if
// not nil, keeps it for the next time.
func (r *Report) lookup(cache **group, name string) *group {
	if cache != nil && *cache != nil {
		return *cache
	}
	g := r.groups[name]
	if g == nil {
		g = &group{name: name}
		r.groups[name] = g
	}
	if cache != nil {
		*cache = g
	}
	return g
}

func (g *group) add(e *entry, i int, ok bool) {
	g.requests++
	switch s := e.status; {
	case s >= 200 && s < 300:
		g.status2xx++
	case s >= 400 && s < 500:
		g.status4xx++
		switch s {
		case 401:
			g.status401++
		case 403:
			g.status403++
		case 429:
			g.status429++
		}
	case s >= 500 && s < 600:
		g.status5xx++
	}
	g.bytesOut += e.size
	if e.hasTS {
		if !g.hasTS || e.ts < g.first {
			g.first = e.ts
		}
		if !g.hasTS || e.ts > g.last {
			g.last = e.ts
		}
		g.hasTS = true
	}
	if e.hasDur {
		g.durations.add(e.duration, i, ok)
	}
}

// Stats returns the counts of what the report has read so far.
func (r *Report) Stats() Stats { return r.stats }

// Rows returns the groups, by requests (most first), then by name.
func (r *Report) Rows() []Row {
	rows := make([]Row, 0, len(r.groups))
	for _, g := range r.groups {
		rows = append(rows, g.row(r.total.requests))
	}
	slices.SortFunc(rows, func(a, b Row) int {
		if c := cmp.Compare(b.Requests, a.Requests); c != 0 {
			return c
		}
		return strings.Compare(a.Group, b.Group)
	})
	return rows
}

// Total returns the sums of all groups, named "TOTAL".
func (r *Report) Total() Row {
	row := r.total.row(r.total.requests)
	row.Group = "TOTAL"
	return row
}

func (g *group) row(total int64) Row {
	row := Row{
		Group:     g.name,
		Requests:  g.requests,
		Status2xx: g.status2xx, Status4xx: g.status4xx, Status5xx: g.status5xx,
		Status401: g.status401, Status403: g.status403, Status429: g.status429,
		BytesOut: g.bytesOut,
	}
	if total > 0 {
		row.Share = 100 * float64(g.requests) / float64(total)
	}
	if g.durations.n > 0 {
		row.HasDuration = true
		row.P50 = seconds(g.durations.quantile(0.50))
		row.P95 = seconds(g.durations.quantile(0.95))
		row.P99 = seconds(g.durations.quantile(0.99))
	}
	if g.hasTS {
		row.FirstSeen, row.LastSeen = unixTime(g.first), unixTime(g.last)
	}
	return row
}

func seconds(s float64) time.Duration {
	if s >= math.MaxInt64/1e9 {
		return math.MaxInt64
	}
	return time.Duration(math.Round(s * 1e9))
}

// unixTime converts unix seconds to a time, to the microsecond: a float64
// of seconds since 1970 holds no more.
func unixTime(s float64) time.Time {
	sec, frac := math.Modf(s)
	return time.Unix(int64(sec), int64(math.Round(frac*1e9))).Round(time.Microsecond).UTC()
}
