package apikey

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/redis/go-redis/v9"
	"github.com/spf13/cobra"

	"github.com/keystile/caddy-apikey/internal/regularfile"
)

// cliRedisTimeout bounds each Redis command of the CLI, connecting
// included. It is longer than the handler's, since nobody's request waits
// for it, but short enough that a wrong address fails promptly.
var cliRedisTimeout = 5 * time.Second

// addRedisFlags declares the flags that connect a command to Redis. If the
// command has --keys-file, at most one of the two may be given; with
// required, one must be.
func addRedisFlags(c *cobra.Command, required bool) {
	fl := c.Flags()
	fl.StringSlice("redis", nil, "Redis address host:port; repeat or separate with commas for a Cluster (or the Sentinels, with --redis-master-name)")
	fl.String("redis-username", "", "Redis ACL username")
	fl.String("redis-password", "{env.REDIS_PASSWORD}", "Redis password; by default read from the environment variable REDIS_PASSWORD, so that it need not be on the command line ({env.NAME} placeholders are expanded)")
	fl.Int("redis-db", 0, "Redis database number (not with a Cluster)")
	fl.Bool("redis-tls", false, "connect to Redis with TLS, verifying its certificate with the system's roots")
	fl.String("redis-key-prefix", defaultRedisPrefix, "prefix of every Redis key and of the change channel, as key_prefix in the redis block")
	fl.String("redis-master-name", "", "name of the master that the Sentinels at --redis watch")
	switch {
	case fl.Lookup("keys-file") == nil:
		if required {
			_ = c.MarkFlagRequired("redis")
		}
	case required:
		c.MarkFlagsOneRequired("keys-file", "redis")
		fallthrough
	default:
		c.MarkFlagsMutuallyExclusive("keys-file", "redis")
	}
}

// usesRedis reports whether the command was given --redis.
func usesRedis(cmd *cobra.Command) bool {
	return cmd.Flags().Changed("redis")
}

// cliRedis is the Redis connection of one CLI command.
type cliRedis struct {
	client   redis.UniversalClient
	schema   redisSchema
	timeout  time.Duration
	where    string // "redis <addresses>", for messages
	password string // kept out of every error
	parent   context.Context
}

// connectRedis connects to the Redis that the command's flags name and
// checks that it answers, so that a wrong address or password is reported
// as such before anything is done.
func connectRedis(cmd *cobra.Command) (*cliRedis, error) {
	fl := cmd.Flags()
	addrs, _ := fl.GetStringSlice("redis")
	username, _ := fl.GetString("redis-username")
	password, _ := fl.GetString("redis-password")
	db, _ := fl.GetInt("redis-db")
	useTLS, _ := fl.GetBool("redis-tls")
	prefix, _ := fl.GetString("redis-key-prefix")
	master, _ := fl.GetString("redis-master-name")
	addrs = slices.DeleteFunc(addrs, func(a string) bool { return strings.TrimSpace(a) == "" })
	if len(addrs) == 0 {
		return nil, errors.New("--redis: want an address host:port")
	}
	if db < 0 {
		return nil, fmt.Errorf("--redis-db %d: want 0 or more", db)
	}
	if db != 0 && len(addrs) > 1 && master == "" {
		return nil, errors.New("--redis-db: a Redis Cluster has only database 0")
	}
	opts, schema, timeout, err := redisOptions(RedisConfig{
		Addresses:  addrs,
		MasterName: master,
		Username:   username,
		Password:   password,
		DB:         db,
		TLS:        useTLS,
		KeyPrefix:  prefix,
		Timeout:    caddy.Duration(cliRedisTimeout),
	}, caddy.NewReplacer())
	if err != nil {
		return nil, err
	}
	// go-redis's own lines (each failed dial) go where the server's do:
	// Caddy's log at debug level, which the CLI does not show. The
	// command's error says what failed.
	redisLogOnce.Do(func() { redis.SetLogger(redisLog{}) })
	r := &cliRedis{
		client:   redis.NewUniversalClient(opts),
		schema:   schema,
		timeout:  timeout,
		where:    "redis " + strings.Join(opts.Addrs, ","),
		password: opts.Password,
		parent:   cmd.Context(),
	}
	if r.parent == nil {
		r.parent = context.Background()
	}
	ctx, cancel := r.ctx()
	defer cancel()
	if err := r.client.Ping(ctx).Err(); err != nil {
		r.client.Close()
		return nil, r.fail("connecting", err)
	}
	return r, nil
}

func (r *cliRedis) close() { _ = r.client.Close() }

// ctx is the context of one command.
func (r *cliRedis) ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(r.parent, r.timeout)
}

// fail says which step against Redis failed. The password is taken out of
// the message in case a server or a proxy ever echoes it; the error is then
// not wrapped, so that the original cannot show it either.
func (r *cliRedis) fail(step string, err error) error {
	if r.password != "" && strings.Contains(err.Error(), r.password) {
		msg := strings.ReplaceAll(err.Error(), r.password, "[password]")
		return fmt.Errorf("%s: %s: %s", r.where, step, msg)
	}
	return fmt.Errorf("%s: %s: %w", r.where, step, err)
}

// Scripts that make a check and the write it guards one step. Each touches
// one key, so that they run on a Cluster too, where a key's record and its
// id index live in different slots.
var (
	// redisCreateScript writes the hash KEYS[1] from the field-value pairs
	// in ARGV unless it exists; 1 if it wrote it.
	redisCreateScript = redis.NewScript(`
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1`)

	// redisReplaceScript replaces the hash KEYS[1] with the fields ARGV,
	// if it still exists (a key removed meanwhile is not brought back
	// without its id index); 1 if it did.
	redisReplaceScript = redis.NewScript(`
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1`)

	// redisEditScript runs the command ARGV[1] on the hash KEYS[1] with
	// the rest of ARGV, if the hash exists (so that an edit never leaves a
	// record of one field behind); 1 if it did.
	redisEditScript = redis.NewScript(`
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call(ARGV[1], KEYS[1], unpack(ARGV, 2))
return 1`)

	// redisReleaseScript deletes KEYS[1] if it still holds ARGV[1].
	redisReleaseScript = redis.NewScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0`)
)

// refusedError is a key that cannot be written as asked (its id or hash is
// taken); Redis itself is fine.
type refusedError struct{ reason string }

func (e refusedError) Error() string { return e.reason }

// putResult says what put did.
type putResult int

const (
	putCreated putResult = iota
	putUpdated
)

// put writes the record of e to Redis: the id index first (SET NX, which
// reserves the id), then the hash, unless another key has it. With update,
// a record whose id is already there with the same hash is replaced as a
// whole (fields e lacks are removed). The change is published.
func (r *cliRedis) put(w io.Writer, e keyFileEntry, update bool) (putResult, error) {
	rec, err := e.record()
	if err != nil {
		return 0, fmt.Errorf("key %q: %w", e.ID, err)
	}
	hexDigest := hex.EncodeToString(rec.digest[:])
	fields, err := entryHash(e)
	if err != nil {
		return 0, fmt.Errorf("key %q: %w", e.ID, err)
	}
	args := hashArgs(fields)
	idKey, keyKey := r.schema.idKey(e.ID), r.schema.keyKey(hexDigest)

	ctx, cancel := r.ctx()
	reserved, err := r.client.SetNX(ctx, idKey, hexDigest, 0).Result()
	cancel()
	if err != nil {
		return 0, r.fail(fmt.Sprintf("reserving id %q", e.ID), err)
	}
	result := putCreated
	if reserved {
		ctx, cancel := r.ctx()
		created, err := redisCreateScript.Run(ctx, r.client, []string{keyKey}, args...).Int()
		cancel()
		if err != nil || created == 0 {
			// No id index without its record.
			if rerr := r.release(idKey, hexDigest); rerr != nil {
				fmt.Fprintf(w, "warning: id %q reserved but not released: %v\n", e.ID, rerr)
			}
		}
		if err != nil {
			return 0, r.fail(fmt.Sprintf("writing key %q", e.ID), err)
		}
		if created == 0 {
			return 0, refusedError{"its hash is already in Redis, under another id"}
		}
	} else {
		if !update {
			return 0, refusedError{"id already in Redis"}
		}
		ctx, cancel := r.ctx()
		cur, err := r.client.Get(ctx, idKey).Result()
		cancel()
		switch {
		case errors.Is(err, redis.Nil):
			return 0, refusedError{"id removed from Redis while being imported; try again"}
		case err != nil:
			return 0, r.fail(fmt.Sprintf("reading id %q", e.ID), err)
		case cur != hexDigest:
			return 0, refusedError{"id already in Redis, with another hash"}
		}
		ctx, cancel = r.ctx()
		replaced, err := redisReplaceScript.Run(ctx, r.client, []string{keyKey}, args...).Int()
		cancel()
		if err != nil {
			return 0, r.fail(fmt.Sprintf("updating key %q", e.ID), err)
		}
		if replaced == 0 {
			return 0, refusedError{"removed from Redis while being imported; try again"}
		}
		result = putUpdated
	}
	if err := r.publish(hexDigest); err != nil {
		fmt.Fprintf(w, "warning: key %q written, but %v; servers that cached it see the change within their cache ttl\n", e.ID, err)
	}
	return result, nil
}

// hashArgs flattens a record's fields into HSET's field-value pairs, in
// name order.
func hashArgs(fields map[string]any) []any {
	names := make([]string, 0, len(fields))
	for name := range fields {
		names = append(names, name)
	}
	slices.Sort(names)
	args := make([]any, 0, 2*len(names))
	for _, name := range names {
		args = append(args, name, fields[name])
	}
	return args
}

// release deletes an id index that put reserved, unless someone else has
// set it since. It gets a context of its own: the failed step may have
// used up the last one.
func (r *cliRedis) release(idKey, hexDigest string) error {
	ctx, cancel := r.ctx()
	defer cancel()
	if err := redisReleaseScript.Run(ctx, r.client, []string{idKey}, hexDigest).Err(); err != nil {
		return r.fail("releasing the id", err)
	}
	return nil
}

// publish tells every server listening that the key with hexDigest
// changed, so that it drops what it cached of it.
func (r *cliRedis) publish(hexDigest string) error {
	ctx, cancel := r.ctx()
	defer cancel()
	if err := r.client.Publish(ctx, r.schema.channel(), hexDigest).Err(); err != nil {
		return r.fail("publishing the change", err)
	}
	return nil
}

// generateRedis writes a new key's record to Redis, for generate --redis.
func generateRedis(cmd *cobra.Command, e keyFileEntry) error {
	r, err := connectRedis(cmd)
	if err != nil {
		return err
	}
	defer r.close()
	if _, err := r.put(cmd.ErrOrStderr(), e, false); err != nil {
		var refused refusedError
		if errors.As(err, &refused) {
			return fmt.Errorf("adding key %q to %s: %w", e.ID, r.where, err)
		}
		return err
	}
	fmt.Fprintf(cmd.ErrOrStderr(), "added key %q to %s\n", e.ID, r.where)
	return nil
}

func importCommand() *cobra.Command {
	c := &cobra.Command{
		Use:   "import --redis ADDR KEYS_FILE",
		Short: "Writes the keys of a keys file to Redis",
		Long: `Reads a keys file and writes every key in it to Redis, where api_key
handlers with store redis look keys up. The file must load as a whole, as
the handler would load it; if it does not, nothing is written.

A key whose id is already in Redis with the same hash is replaced by the
file's record (fields the file lacks are removed). A key whose id is there
with another hash, or whose hash is there under another id, is refused and
reported; the other keys are imported. Prints "imported N, updated M,
refused K"; the exit status is 1 if a key was refused. Every change is
published, so that running servers drop what they cached of the key.`,
		Args: cobra.ExactArgs(1),
	}
	addRedisFlags(c, true)
	c.RunE = runE(func(cmd *cobra.Command, args []string) error {
		path := args[0]
		data, _, err := regularfile.ReadFile(path)
		if err != nil {
			return fmt.Errorf("reading keys file %s: %w", path, err)
		}
		if _, err := parseKeysFile(data); err != nil {
			return fmt.Errorf("loading keys file %s: %w; nothing imported", path, err)
		}
		var file struct {
			Keys []keyFileEntry `json:"keys"`
		}
		if err := json.Unmarshal(data, &file); err != nil {
			// parseKeysFile took it; this would be a bug.
			return fmt.Errorf("loading keys file %s: %w; nothing imported", path, err)
		}
		r, err := connectRedis(cmd)
		if err != nil {
			return fmt.Errorf("%w; nothing imported", err)
		}
		defer r.close()
		stderr := cmd.ErrOrStderr()
		var imported, updated, refused int
		for i, e := range file.Keys {
			res, err := r.put(stderr, e, true)
			var ref refusedError
			switch {
			case errors.As(err, &ref):
				refused++
				fmt.Fprintf(stderr, "keys[%d]%s: refused: %v\n", i, idLabel(e.ID), err)
			case err != nil:
				return fmt.Errorf("keys[%d]%s: %w (imported %d, updated %d, refused %d before it; the rest not imported)",
					i, idLabel(e.ID), err, imported, updated, refused)
			case res == putUpdated:
				updated++
			default:
				imported++
			}
		}
		fmt.Fprintf(cmd.OutOrStdout(), "imported %d, updated %d, refused %d\n", imported, updated, refused)
		if refused > 0 {
			return fmt.Errorf("%s into %s: %d of %d keys refused", path, r.where, refused, len(file.Keys))
		}
		return nil
	})
	return c
}

// stateRedis is disable, enable and remove with --redis.
func stateRedis(cmd *cobra.Command, verb, id string) error {
	if err := checkID(id); err != nil {
		return fmt.Errorf("--id: %w", err)
	}
	r, err := connectRedis(cmd)
	if err != nil {
		return err
	}
	defer r.close()
	idKey := r.schema.idKey(id)
	ctx, cancel := r.ctx()
	hexDigest, err := r.client.Get(ctx, idKey).Result()
	cancel()
	if errors.Is(err, redis.Nil) {
		return fmt.Errorf("%s: no key with id %q", r.where, id)
	}
	if err != nil {
		return r.fail(fmt.Sprintf("looking up id %q", id), err)
	}
	keyKey := r.schema.keyKey(hexDigest)
	ctx, cancel = r.ctx()
	defer cancel()
	switch verb {
	case "disable", "enable":
		args := []any{"HSET", "disabled", "true"}
		if verb == "enable" {
			args = []any{"HDEL", "disabled"}
		}
		done, err := redisEditScript.Run(ctx, r.client, []string{keyKey}, args...).Int()
		if err != nil {
			return r.fail(fmt.Sprintf("%s key %q", verb, id), err)
		}
		if done == 0 {
			return fmt.Errorf("%s: key with id %q: its id is indexed, but its record is missing (remove the id and import the key again)", r.where, id)
		}
	case "remove":
		// The record first: once it is gone the key is refused, even if
		// removing the index fails.
		if err := r.client.Del(ctx, keyKey).Err(); err != nil {
			return r.fail(fmt.Sprintf("removing key %q", id), err)
		}
		if err := redisReleaseScript.Run(ctx, r.client, []string{idKey}, hexDigest).Err(); err != nil {
			return r.fail(fmt.Sprintf("removing id %q", id), err)
		}
	}
	if err := r.publish(hexDigest); err != nil {
		return fmt.Errorf("key %q changed, but %w; servers that cached it see the change within their cache ttl", id, err)
	}
	done := map[string]string{"disable": "disabled", "enable": "enabled", "remove": "removed"}[verb]
	fmt.Fprintf(cmd.ErrOrStderr(), "%s key %q in %s\n", done, id, r.where)
	return nil
}

// listRedis is list with --redis: every key record under the prefix, in
// the table of the keys-file list, by id.
func listRedis(cmd *cobra.Command) error {
	r, err := connectRedis(cmd)
	if err != nil {
		return err
	}
	defer r.close()
	names, err := r.scanKeys()
	if err != nil {
		return err
	}
	type row struct {
		e     keyFileEntry
		hex   string
		state string
	}
	rows := make([]row, 0, len(names))
	const batch = 500
	for start := 0; start < len(names); start += batch {
		part := names[start:min(start+batch, len(names))]
		ctx, cancel := r.ctx()
		cmds, err := r.client.Pipelined(ctx, func(p redis.Pipeliner) error {
			for _, name := range part {
				p.HGetAll(ctx, name)
			}
			return nil
		})
		cancel()
		for i, c := range cmds {
			hexDigest := part[i][len(r.schema.keyKey("")):]
			fields, ferr := c.(*redis.MapStringStringCmd).Result()
			if ferr != nil && !isWrongType(ferr) {
				return r.fail("reading keys", ferr)
			}
			if ferr == nil && len(fields) == 0 {
				continue // removed since the scan
			}
			rw := row{hex: hexDigest, state: "invalid"}
			if ferr == nil {
				if e, err := entryFromHash(hexDigest, fields); err == nil {
					rw.e = e
					if rec, err := e.record(); err == nil {
						rw.state = keyState(rec, time.Now())
					}
				} else {
					rw.e.ID = fields["id"]
				}
			}
			rows = append(rows, rw)
		}
		if err != nil && len(cmds) == 0 {
			return r.fail("reading keys", err)
		}
	}
	slices.SortFunc(rows, func(a, b row) int {
		if c := strings.Compare(a.e.ID, b.e.ID); c != 0 {
			return c
		}
		return strings.Compare(a.hex, b.hex)
	})
	tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tNAME\tOWNER\tPLAN\tEXPIRES\tSTATE")
	for _, rw := range rows {
		e := rw.e
		if e.ID == "" {
			e.ID = "(no id)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", dash(e.ID), dash(e.Name), dash(e.Owner), dash(e.Plan), dash(e.Expires), rw.state)
	}
	return tw.Flush()
}

func isWrongType(err error) bool {
	return strings.HasPrefix(err.Error(), "WRONGTYPE")
}

// scanKeys returns the names of every key record under the prefix, from
// every master of a Cluster.
func (r *cliRedis) scanKeys() ([]string, error) {
	pattern := globEscape(r.schema.keyKey("")) + "*"
	keyLen := len(r.schema.keyKey("")) + 64
	var mu sync.Mutex
	var names []string
	scan := func(ctx context.Context, c redis.Cmdable) error {
		var cursor uint64
		for {
			cctx, cancel := context.WithTimeout(ctx, r.timeout)
			keys, next, err := c.Scan(cctx, cursor, pattern, 1000).Result()
			cancel()
			if err != nil {
				return err
			}
			mu.Lock()
			for _, k := range keys {
				// Only <prefix>key:<64 hex digits>: a longer prefix
				// that starts with this one is another deployment's.
				if len(k) == keyLen && isLowerHex(k[keyLen-64:]) {
					names = append(names, k)
				}
			}
			mu.Unlock()
			if cursor = next; cursor == 0 {
				return nil
			}
		}
	}
	var err error
	if cc, ok := r.client.(*redis.ClusterClient); ok {
		err = cc.ForEachMaster(r.parent, func(ctx context.Context, node *redis.Client) error {
			return scan(ctx, node)
		})
	} else {
		err = scan(r.parent, r.client)
	}
	if err != nil {
		return nil, r.fail("listing keys", err)
	}
	return names, nil
}

// globEscape quotes the characters that SCAN's MATCH pattern treats as
// special.
func globEscape(s string) string {
	var b strings.Builder
	for _, c := range s {
		if strings.ContainsRune(`*?[]\`, c) {
			b.WriteByte('\\')
		}
		b.WriteRune(c)
	}
	return b.String()
}

func isLowerHex(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}
