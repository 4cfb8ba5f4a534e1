package apikey

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"

	"github.com/keystile/caddy-apikey/internal/keyformat"
	"github.com/keystile/caddy-apikey/internal/keysedit"
	"github.com/keystile/caddy-apikey/internal/regularfile"
)

func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:  "api-key",
		Usage: "generate|hash|list|disable|enable|remove|check|import|report [flags]",
		Short: "Makes API keys and edits keys files or Redis for the api_key handler",
		Long: `
Makes API keys in the <prefix>_<random><checksum> format and edits the JSON
keys files that the api_key handler reads. A running Caddy picks up every
edit within a few seconds, since it watches the file. Edits are atomic: the
file is written to a temporary file, synced and renamed, and left untouched
on any error.

With --redis ADDR instead of --keys-file, generate, list, disable, enable
and remove work on the keys in Redis (store redis), and import copies a keys
file there. Every change in Redis is published, so that every running Caddy
drops what it cached of the key within a second.

The secret of a key is printed once, by generate, and never stored: the file
holds its SHA-256 hash.`,
		CobraFunc: func(cmd *cobra.Command) {
			cmd.AddCommand(generateCommand(), hashCommand(), listCommand(),
				stateCommand("disable"), stateCommand("enable"), stateCommand("remove"),
				checkCommand(), importCommand(), reportCommand())
		},
	})
}

// runE adapts a command's function to cobra: it prints errors itself, and
// a non-nil error makes the exit status 1.
func runE(f func(cmd *cobra.Command, args []string) error) func(*cobra.Command, []string) error {
	return func(cmd *cobra.Command, args []string) error {
		err := f(cmd, args)
		if err != nil {
			cmd.SilenceUsage = true
		}
		return err
	}
}

func generateCommand() *cobra.Command {
	c := &cobra.Command{
		Use:   "generate [--prefix P] [--id ID] [--name N] [--owner O] [--plan P] [--expires RFC3339|DURATION] [--keys-file F | --redis ADDR]",
		Short: "Makes a new key; prints it once, then its keys-file record",
		Long: `Makes a new key and prints two lines: the key itself (shown this once; store
it now), then its keys-file record, which holds the key's hash, not the key.
With --keys-file the record is also added to that file (refused if the id or
hash is already there); with --redis it is written to Redis (refused
likewise) and running servers are told.`,
		Args: cobra.NoArgs,
	}
	fl := c.Flags()
	fl.String("prefix", "key", "key prefix, declared with prefix <p> in the api_key directive")
	fl.String("id", "", "key id, as logs and placeholders show it (default: <owner or prefix>-<random>)")
	fl.String("name", "", "key name")
	fl.String("owner", "", "key owner")
	fl.String("plan", "", "plan name, as defined in the api_key directive")
	fl.String("expires", "", "expiry: an RFC 3339 time, or a duration from now such as 720h or 90d")
	fl.String("keys-file", "", "keys file to add the record to")
	addRedisFlags(c, false)
	c.RunE = runE(func(cmd *cobra.Command, _ []string) error {
		get := func(name string) string { v, _ := cmd.Flags().GetString(name); return v }
		prefix := get("prefix")
		key, err := keyformat.Generate(prefix)
		if err != nil {
			return err
		}
		id := get("id")
		if id == "" {
			base := get("owner")
			if base == "" || checkID(base) != nil {
				base = prefix
			}
			id = base + "-" + randomSuffix()
		}
		entry := keyFileEntry{ID: id, Hash: hashKey(key), Name: get("name"), Owner: get("owner"), Plan: get("plan")}
		if exp := get("expires"); exp != "" {
			if entry.Expires, err = expiryTime(exp, time.Now()); err != nil {
				return err
			}
		}
		if _, err := entry.record(); err != nil {
			return fmt.Errorf("the new record (id %q): %w", id, err)
		}
		rec, err := json.Marshal(entry)
		if err != nil {
			return err
		}
		if path := get("keys-file"); path != "" {
			f, err := keysedit.LoadOrNew(path)
			if err != nil {
				return err
			}
			if err := f.Add(rec); err != nil {
				// err names the key: "adding key <id>: ..."
				return fmt.Errorf("%s: %w", path, err)
			}
			if _, err := serverLoads(f, "adding the key"); err != nil {
				return err
			}
			if err := f.Save(); err != nil {
				return err
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "added key %q to %s\n", id, path)
		} else if usesRedis(cmd) {
			if err := generateRedis(cmd, entry); err != nil {
				return err
			}
		}
		out := cmd.OutOrStdout()
		fmt.Fprintln(out, key)
		_, err = fmt.Fprintf(out, "%s\n", rec)
		return err
	})
	return c
}

// randomSuffix is 8 random lowercase hex digits for a default key id; it
// shares nothing with the key.
func randomSuffix() string {
	var b [4]byte
	_, _ = rand.Read(b[:])
	return fmt.Sprintf("%x", b)
}

// expiryTime reads --expires: an RFC 3339 time, or a duration from now
// (Caddy's syntax, which accepts days: 90d).
func expiryTime(s string, now time.Time) (string, error) {
	if t, err := time.Parse(time.RFC3339, s); err == nil {
		return t.UTC().Format(time.RFC3339), nil
	}
	d, err := caddy.ParseDuration(s)
	if err != nil || d <= 0 {
		return "", fmt.Errorf("--expires %q: want an RFC 3339 time such as 2027-01-31T00:00:00Z or a positive duration such as 720h or 90d", s)
	}
	return now.Add(d).UTC().Truncate(time.Second).Format(time.RFC3339), nil
}

func hashCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "hash",
		Short: "Reads a key on stdin and prints its sha256:<hex> hash",
		Long: `Reads one key from standard input (a final newline is ignored) and prints
the hash that a keys file or a key subdirective takes: sha256:<64 hex digits>.`,
		Args: cobra.NoArgs,
		RunE: runE(func(cmd *cobra.Command, _ []string) error {
			key, err := readKey(cmd.InOrStdin())
			if err != nil {
				return err
			}
			_, err = fmt.Fprintln(cmd.OutOrStdout(), hashKey(key))
			return err
		}),
	}
}

// readKey reads a key from r: its first line, which must be all there is.
func readKey(r io.Reader) (string, error) {
	data, err := io.ReadAll(io.LimitReader(r, maxKeyLen+3))
	if err != nil {
		return "", fmt.Errorf("reading the key: %w", err)
	}
	key := strings.TrimSuffix(strings.TrimSuffix(string(data), "\n"), "\r")
	if !validKey(key) {
		return "", fmt.Errorf("no key on stdin: want one line of 1 to %d visible ASCII characters", maxKeyLen)
	}
	return key, nil
}

func listCommand() *cobra.Command {
	c := &cobra.Command{
		Use:   "list (--keys-file F | --redis ADDR)",
		Short: "Lists the keys of a keys file or Redis: ids, names, owners, plans, expiry, state",
		Args:  cobra.NoArgs,
	}
	c.Flags().String("keys-file", "", "keys file (or --redis)")
	addRedisFlags(c, true)
	c.RunE = runE(func(cmd *cobra.Command, _ []string) error {
		if usesRedis(cmd) {
			return listRedis(cmd)
		}
		path, _ := cmd.Flags().GetString("keys-file")
		data, raws, err := readKeyEntries(path)
		if err != nil {
			return err
		}
		tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "ID\tNAME\tOWNER\tPLAN\tEXPIRES\tSTATE")
		now := time.Now()
		invalid := 0
		for i, c := range checkEntries(raws) {
			state := "invalid"
			if c.rec != nil {
				state = keyState(c.rec, now)
			} else {
				invalid++
			}
			e := c.entry
			if e.ID == "" {
				e.ID = fmt.Sprintf("(keys[%d])", i)
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", dash(e.ID), dash(e.Name), dash(e.Owner), dash(e.Plan), dash(e.Expires), state)
		}
		if err := tw.Flush(); err != nil {
			return err
		}
		// The server loads the file whole or not at all: an invalid
		// entry, or a fault of the file itself (a second "keys", data
		// after it), keeps every key of it out.
		if _, err := parseKeysFile(data); err != nil {
			msg := "the server will not load " + path
			if invalid != 0 {
				entries := "entries"
				if invalid == 1 {
					entries = "entry"
				}
				msg = fmt.Sprintf("%d invalid %s: %s", invalid, entries, msg)
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "%s: %v\ncaddy api-key check --keys-file %s lists every problem\n", msg, err, path)
		}
		return nil
	})
	return c
}

// serverLoads returns the key set the server would load from f as it is
// now, after an edit (what: "disable of key \"a\"", say) and before it is
// saved, or why it would not load it. A server keeps the keys it has while
// its file does not load: an edit saved into such a file would be reported
// done and not take, and a key meant to be disabled would keep working. So
// nothing is written then.
func serverLoads(f *keysedit.File, what string) (*keySet, error) {
	set, err := parseKeysFile(f.Bytes())
	if err != nil {
		return nil, fmt.Errorf("%s: nothing written: the server would not load the file after the %s: %w (caddy api-key check --keys-file %s lists every problem)", f.Path(), what, err, f.Path())
	}
	return set, nil
}

// recordWithID returns the record of set with the given id, or nil.
func recordWithID(set *keySet, id string) *keyRecord {
	for _, rec := range set.all() {
		if rec.id == id {
			return rec
		}
	}
	return nil
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return strings.Map(func(r rune) rune {
		if r < ' ' || r == 0x7f {
			return '?'
		}
		return r
	}, s)
}

// keyState is what a request with the key would be told now: active,
// disabled, not_yet_valid or expired.
func keyState(rec *keyRecord, now time.Time) string {
	h := Handler{now: func() int64 { return now.UnixNano() }}
	if outcome, err := h.lifecycle(rec); err != nil {
		return outcome
	}
	return "active"
}

// stateCommand makes disable, enable and remove.
func stateCommand(verb string) *cobra.Command {
	short := map[string]string{
		"disable": "Disables a key: requests with it get 401, outcome disabled",
		"enable":  "Enables a disabled key again",
		"remove":  "Removes a key from a keys file or Redis",
	}[verb]
	c := &cobra.Command{
		Use:   verb + " (--keys-file F | --redis ADDR) --id ID",
		Short: short,
		Args:  cobra.NoArgs,
	}
	c.Flags().String("keys-file", "", "keys file (or --redis)")
	c.Flags().String("id", "", "key id (required)")
	addRedisFlags(c, true)
	_ = c.MarkFlagRequired("id")
	c.RunE = runE(func(cmd *cobra.Command, _ []string) error {
		path, _ := cmd.Flags().GetString("keys-file")
		id, _ := cmd.Flags().GetString("id")
		if usesRedis(cmd) {
			return stateRedis(cmd, verb, id)
		}
		f, err := keysedit.Load(path)
		if err != nil {
			return err
		}
		switch verb {
		case "disable":
			err = f.Set(id, "disabled", true)
		case "enable":
			err = f.Set(id, "disabled", nil)
		case "remove":
			err = f.Remove(id)
		}
		if err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		// The edited file as the server will read it, so that the
		// command never reports an edit that does not take.
		set, err := serverLoads(f, verb+" of key "+strconv.Quote(id))
		if err != nil {
			return err
		}
		if verb != "remove" {
			if rec := recordWithID(set, id); rec == nil || rec.disabled != (verb == "disable") {
				return fmt.Errorf("%s: key %q: the edit would not take; fix the entry by hand", path, id)
			}
		}
		if err := f.Save(); err != nil {
			return err
		}
		done := map[string]string{"disable": "disabled", "enable": "enabled", "remove": "removed"}[verb]
		fmt.Fprintf(cmd.ErrOrStderr(), "%s key %q in %s\n", done, id, path)
		return nil
	})
	return c
}

func checkCommand() *cobra.Command {
	c := &cobra.Command{
		Use:   "check --keys-file F [--config Caddyfile]",
		Short: "Checks a keys file and reports every problem with its entry",
		Long: `Checks a keys file as the api_key handler would load it and reports every
problem, each with its entry. With --config, the plans that keys name are
checked against the api_key handlers of that config (a Caddyfile, or JSON
with --adapter json) that use this keys file. The exit status is 1 if there
is any problem.`,
		Args: cobra.NoArgs,
	}
	c.Flags().String("keys-file", "", "keys file (required)")
	c.Flags().String("config", "", "Caddy config whose plans the keys must use")
	c.Flags().String("adapter", "caddyfile", "config adapter of --config")
	_ = c.MarkFlagRequired("keys-file")
	c.RunE = runE(func(cmd *cobra.Command, _ []string) error {
		path, _ := cmd.Flags().GetString("keys-file")
		config, _ := cmd.Flags().GetString("config")
		adapter, _ := cmd.Flags().GetString("adapter")
		var plans []map[string]bool
		if config != "" {
			var err error
			if plans, err = configPlans(config, adapter, path); err != nil {
				return err
			}
		}
		problems, keys, err := checkKeysFile(path, plans)
		if err != nil {
			return err
		}
		out := cmd.OutOrStdout()
		for _, p := range problems {
			fmt.Fprintln(out, p)
		}
		switch len(problems) {
		case 0:
		case 1:
			return fmt.Errorf("%s: 1 problem", path)
		default:
			return fmt.Errorf("%s: %d problems", path, len(problems))
		}
		fmt.Fprintf(out, "%s: %d keys, no problems\n", path, keys)
		return nil
	})
	return c
}

// checkKeysFile reads a keys file and returns every problem, each naming
// its entry, and the number of entries. plans, when not nil, are the plan
// names of each handler that uses the file; a key's plan must be in all
// of them. The error is for a file that cannot be read as a keys file at
// all.
func checkKeysFile(path string, plans []map[string]bool) ([]string, int, error) {
	data, raws, err := readKeyEntries(path)
	if err != nil {
		return nil, 0, err
	}
	var problems []string
	for i, c := range checkEntries(raws) {
		problems = append(problems, c.problems...)
		if c.rec == nil || c.rec.plan == "" {
			continue
		}
		for _, known := range plans {
			if !known[c.rec.plan] {
				problems = append(problems, fmt.Sprintf("keys[%d]%s: unknown plan %q", i, idLabel(c.entry.ID), c.rec.plan))
				break
			}
		}
	}
	// Whatever the entries say, the file must load as a whole too.
	if len(problems) == 0 {
		if _, err := parseKeysFile(data); err != nil {
			problems = append(problems, err.Error())
		}
	}
	return problems, len(raws), nil
}

// readKeyEntries reads a keys file and returns it and its entries, each
// still undecoded. The error is for a file that is not even the outline
// of a keys file; it says where and why, as the server would.
func readKeyEntries(path string) ([]byte, []json.RawMessage, error) {
	data, _, err := regularfile.ReadFile(path)
	if err != nil {
		return nil, nil, fmt.Errorf("reading keys file %s: %w", path, err)
	}
	var top struct {
		Keys []json.RawMessage `json:"keys"`
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&top); err != nil || top.Keys == nil {
		if _, perr := parseKeysFile(data); perr != nil {
			return nil, nil, fmt.Errorf("loading keys file %s: %w", path, perr)
		}
		return nil, nil, fmt.Errorf("reading keys file %s: %v", path, err)
	}
	return data, top.Keys, nil
}

// entryCheck is what checkEntries finds of one entry of a keys file.
type entryCheck struct {
	entry    keyFileEntry // as much of the entry as could be read
	rec      *keyRecord   // nil if the server would refuse the entry
	problems []string     // each naming the entry
}

// checkEntries checks each entry as the server would, one by one, so that
// one bad entry does not hide the others' problems. An entry that cannot
// be read whole still counts for duplicates, by as much of its id and hash
// as can be read: a later entry with the same id or hash is a problem
// whichever of the two is fixed first.
func checkEntries(raws []json.RawMessage) []entryCheck {
	checks := make([]entryCheck, len(raws))
	byID := make(map[string]int)
	byDigest := make(map[[32]byte]int)
	for i, raw := range raws {
		c := &checks[i]
		problem := func(format string, args ...any) {
			c.problems = append(c.problems, fmt.Sprintf("keys[%d]%s: ", i, idLabel(c.entry.ID))+fmt.Sprintf(format, args...))
		}
		if err := decodeEntryJSON(raw, &c.entry); err != nil {
			// What encoding/json could read before it stopped may be
			// partial: read again, leniently, for the id and hash.
			c.entry = keyFileEntry{}
			_ = json.Unmarshal(raw, &c.entry)
			// In the server's words where it has its own.
			if ute, ok := errors.AsType[*json.UnmarshalTypeError](err); ok {
				problem("%s must be %s, not a JSON %s", fieldName(ute), typeName(ute.Type), ute.Value)
			} else {
				problem("%v", err)
			}
		} else if rec, err := c.entry.record(); err != nil {
			problem("%v", err)
		} else {
			c.rec = rec
		}
		if id := c.entry.ID; id != "" {
			if j, dup := byID[id]; dup {
				problem("duplicate id (also keys[%d])", j)
				c.rec = nil
			} else {
				byID[id] = i
			}
		}
		if d, err := parseDigest(c.entry.Hash); err == nil {
			if j, dup := byDigest[d]; dup {
				problem("duplicate hash (same as keys[%d]%s)", j, idSuffix(checks[j].entry.ID))
				c.rec = nil
			} else {
				byDigest[d] = i
			}
		}
	}
	return checks
}

// idSuffix is ", id <id>", or nothing for an entry without one.
func idSuffix(id string) string {
	if id == "" {
		return ""
	}
	return fmt.Sprintf(", id %q", id)
}

// configPlans adapts a Caddy config and returns, for each api_key handler
// whose keys_file is keysFile, the names of its plans.
func configPlans(config, adapterName, keysFile string) ([]map[string]bool, error) {
	body, err := os.ReadFile(config)
	if err != nil {
		return nil, fmt.Errorf("reading config: %w", err)
	}
	adapted := body
	if adapterName != "json" {
		adapter := caddyconfig.GetAdapter(adapterName)
		if adapter == nil {
			return nil, fmt.Errorf("unknown config adapter %q", adapterName)
		}
		if adapted, _, err = adapter.Adapt(body, map[string]any{"filename": config}); err != nil {
			return nil, fmt.Errorf("adapting config %s: %w", config, err)
		}
	}
	var tree any
	if err := json.Unmarshal(adapted, &tree); err != nil {
		return nil, fmt.Errorf("reading config %s: %w", config, err)
	}
	want, err := filepath.Abs(keysFile)
	if err != nil {
		return nil, err
	}
	var plans []map[string]bool
	var walk func(v any)
	walk = func(v any) {
		switch v := v.(type) {
		case map[string]any:
			if v["handler"] == "api_key" {
				if kf, _ := v["keys_file"].(string); kf != "" {
					if abs, err := filepath.Abs(kf); err == nil && abs == want {
						names := make(map[string]bool)
						if ps, ok := v["plans"].(map[string]any); ok {
							for name := range ps {
								names[name] = true
							}
						}
						plans = append(plans, names)
					}
				}
			}
			for _, child := range v {
				walk(child)
			}
		case []any:
			for _, child := range v {
				walk(child)
			}
		}
	}
	walk(tree)
	if len(plans) == 0 {
		return nil, fmt.Errorf("config %s has no api_key handler with keys_file %s", config, keysFile)
	}
	return plans, nil
}
