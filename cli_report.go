package apikey

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/spf13/cobra"

	"github.com/keystile/caddy-apikey/internal/regularfile"
	"github.com/keystile/caddy-apikey/internal/report"
)

func reportCommand() *cobra.Command {
	return reportCommandAt(time.Now)
}

// reportCommandAt is reportCommand with a clock, for --since and --until
// given as durations.
func reportCommandAt(now func() time.Time) *cobra.Command {
	c := &cobra.Command{
		Use:   "report [--key ID] [--owner O] [--keys-file F] [--since T] [--until T] [--by key|owner|plan|status|path] [--format table|json|csv] [--lines] FILES...",
		Short: "Sums up Caddy's JSON access logs per key, owner, plan, status or path",
		Long: `Reads Caddy's JSON access logs and prints, per group (per key by default):
requests, share of all requests, 2xx/4xx/5xx and 401/403/429 counts, bytes
out, the 50th, 95th and 99th percentile of the duration, and when the group
was first and last seen. Requests without a key id (missing or unknown keys)
are grouped under (none).

FILES are log files, plain or gzip-compressed (as Caddy's rotation leaves
them), read in the order given, so a rotated set is its files in a row; - is
standard input. It streams: memory does not grow with the size of the logs.
Lines that are not access-log entries are counted and reported on stderr;
entries of Caddy's other loggers are passed over.

The log names a key by its id only, so --owner and --by owner need the keys
file that gives each id its owner: --keys-file F. Keys it does not hold are
grouped under (unknown).

--since and --until (T: an RFC 3339 time, or a duration back from now such
as 24h or 7d) keep the requests from --since up to, not including, --until.

--lines prints the raw log lines that pass the filters instead of the
report: --key ID --lines filters a log by key. --by path groups by path
without the query string, keeping at most 10000 paths apart and the rest
under (other). Percentiles are within 1% of the exact ones.`,
		Args: func(_ *cobra.Command, args []string) error {
			if len(args) == 0 {
				return errors.New("no log files: give one or more access log files, or - for standard input")
			}
			return nil
		},
	}
	fl := c.Flags()
	fl.String("key", "", "only the requests made with this key id")
	fl.String("owner", "", "only the requests made with keys of this owner (needs --keys-file)")
	fl.String("keys-file", "", "keys file that gives each key id its owner, for --owner and --by owner")
	fl.String("since", "", "only the requests from this time on: RFC 3339, or a duration back from now (24h, 7d)")
	fl.String("until", "", "only the requests before this time: RFC 3339, or a duration back from now")
	fl.String("by", string(report.ByKey), "group by key, owner, plan, status or path")
	fl.String("format", "table", "output format: table, json or csv")
	fl.Bool("lines", false, "print the matching raw log lines instead of a report")
	c.RunE = runE(func(cmd *cobra.Command, args []string) error {
		get := func(name string) string { v, _ := cmd.Flags().GetString(name); return v }
		lines, _ := cmd.Flags().GetBool("lines")
		opts := report.Options{By: report.By(get("by")), Key: get("key"), Owner: get("owner")}
		if !slices.Contains(report.Groupings, opts.By) {
			return fmt.Errorf("--by %q: want key, owner, plan, status or path", opts.By)
		}
		format := get("format")
		if !slices.Contains(report.Formats, format) {
			return fmt.Errorf("--format %q: want table, json or csv", format)
		}
		if lines && (cmd.Flags().Changed("by") || cmd.Flags().Changed("format")) {
			return errors.New("--lines prints log lines, not a report: it takes no --by or --format")
		}
		var err error
		t := now()
		if opts.Since, err = reportTime("since", get("since"), t); err != nil {
			return err
		}
		if opts.Until, err = reportTime("until", get("until"), t); err != nil {
			return err
		}
		keysFile := get("keys-file")
		if keysFile != "" {
			if opts.Owners, err = reportOwners(keysFile); err != nil {
				return err
			}
		}
		if opts.Owners == nil {
			switch {
			case opts.Owner != "":
				return errors.New("--owner needs --keys-file: the access log names keys by id, and the keys file gives their owners")
			case opts.By == report.ByOwner && !lines:
				return errors.New("--by owner needs --keys-file: the access log names keys by id, and the keys file gives their owners")
			}
		}
		if opts.Owner != "" && !ownerKnown(opts.Owners, opts.Owner) {
			return fmt.Errorf("--owner %q: no key in %s has this owner", opts.Owner, keysFile)
		}
		if err := checkLogFiles(args); err != nil {
			return err
		}

		out := bufio.NewWriterSize(cmd.OutOrStdout(), 64<<10)
		if lines {
			opts.By = report.ByKey
			opts.Lines = out
		}
		rep, err := report.New(opts)
		if err != nil {
			return err
		}
		for _, name := range args {
			if err := readLog(rep, cmd.InOrStdin(), name); err != nil {
				out.Flush()
				return err
			}
		}
		if !lines {
			if err := report.Write(out, format, opts.By, rep.Rows(), rep.Total()); err != nil {
				return err
			}
		}
		if err := out.Flush(); err != nil {
			return err
		}
		if st := rep.Stats(); st.Skipped > 0 {
			what := "lines that are not access-log entries"
			if st.Skipped == 1 {
				what = "line that is not an access-log entry"
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "skipped %d %s (the first at %s)\n", st.Skipped, what, st.FirstSkipped)
		}
		return nil
	})
	return c
}

// reportTime reads --since or --until: an RFC 3339 time, or a duration
// (Caddy's syntax, which takes days: 7d) back from now.
func reportTime(flag, s string, now time.Time) (time.Time, error) {
	if s == "" {
		return time.Time{}, nil
	}
	if t, err := time.Parse(time.RFC3339Nano, s); err == nil {
		return t, nil
	}
	d, err := caddy.ParseDuration(s)
	if err != nil || d <= 0 {
		return time.Time{}, fmt.Errorf("--%s %q: want an RFC 3339 time such as 2026-01-31T00:00:00Z or a positive duration back from now such as 24h or 7d", flag, s)
	}
	return now.Add(-d), nil
}

// reportOwners reads the owner of each key id from a keys file. It takes
// each entry on its own, so that a key the server would refuse (expired,
// or with a plan no longer defined) still has its owner: its requests are
// in the logs all the same.
func reportOwners(path string) (map[string]string, error) {
	data, _, err := regularfile.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading keys file %s: %w", path, err)
	}
	var top struct {
		Keys []json.RawMessage `json:"keys"`
	}
	if err := json.Unmarshal(data, &top); err != nil || top.Keys == nil {
		if _, perr := parseKeysFile(data); perr != nil {
			return nil, fmt.Errorf("loading keys file %s: %w", path, perr)
		}
		return nil, fmt.Errorf("reading keys file %s: not a keys file", path)
	}
	owners := make(map[string]string, len(top.Keys))
	for _, raw := range top.Keys {
		var e keyFileEntry
		if json.Unmarshal(raw, &e) == nil && e.ID != "" {
			owners[e.ID] = e.Owner
		}
	}
	return owners, nil
}

func ownerKnown(owners map[string]string, owner string) bool {
	for _, o := range owners {
		if o == owner {
			return true
		}
	}
	return false
}

// checkLogFiles checks, before anything is read, that each log can be:
// so that a typo in the last name does not come after a long read.
func checkLogFiles(names []string) error {
	stdin := false
	for _, name := range names {
		if name == "-" {
			if stdin {
				return errors.New("- (standard input) is given twice")
			}
			stdin = true
			continue
		}
		fi, err := os.Stat(name)
		if err != nil {
			return fmt.Errorf("log file: %w", err)
		}
		if fi.IsDir() {
			return fmt.Errorf("log file %s is a directory: give the files in it (a rotated set as, say, %s)",
				name, strings.TrimSuffix(name, "/")+"/access*.log*")
		}
	}
	return nil
}

// readLog reads one log into rep: the file name, or stdin for -.
func readLog(rep *report.Report, stdin io.Reader, name string) error {
	if name == "-" {
		return rep.Read("stdin", stdin)
	}
	f, err := os.Open(name)
	if err != nil {
		return fmt.Errorf("log file: %w", err)
	}
	defer f.Close()
	return rep.Read(name, f)
}
