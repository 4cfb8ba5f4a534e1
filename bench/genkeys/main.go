// Command genkeys writes the keys files that bench/run.sh loads: n keys
// whose plaintext is derivable (bench-<i>, zero-padded), so that the
// benchmark can send valid keys without keeping a million secrets.
//
//	genkeys -n 1000000 -keys keys.json [-plain keys.txt -plain-n 10000] [-nginx map.conf] [-extra 1]
//
// -keys is the JSON keys file ({"keys":[{"id","hash"}]}); -plain lists the
// first plain-n keys, one a line, for wrk's Lua script; -nginx writes the
// same set as the body of an nginx map block (key → id); -extra adds that
// many further keys, which makes a file that differs from the plain one
// (for a reload under load).
package main

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"flag"
	"fmt"
	"log"
	"os"
)

// benchKey is the plaintext of key i.
func benchKey(i int) string { return fmt.Sprintf("bench-%09d-0123456789abcdefghijklmnop", i) }

func main() {
	n := flag.Int("n", 1000, "number of keys")
	extra := flag.Int("extra", 0, "further keys after the n (ids x<i>) to make a changed file")
	keysPath := flag.String("keys", "", "JSON keys file to write")
	plainPath := flag.String("plain", "", "file of plaintext keys to write, one a line")
	plainN := flag.Int("plain-n", 10000, "how many plaintext keys to write (the first ones)")
	nginxPath := flag.String("nginx", "", "nginx map entries to write")
	flag.Parse()
	if *keysPath == "" {
		log.Fatal("genkeys: -keys is required")
	}
	if err := writeKeys(*keysPath, *n, *extra); err != nil {
		log.Fatalf("genkeys: writing %s: %v", *keysPath, err)
	}
	if *plainPath != "" {
		if err := writeLines(*plainPath, min(*plainN, *n), func(i int) string { return benchKey(i) }); err != nil {
			log.Fatalf("genkeys: writing %s: %v", *plainPath, err)
		}
	}
	if *nginxPath != "" {
		if err := writeLines(*nginxPath, *n, func(i int) string { return fmt.Sprintf("%q k%d;", benchKey(i), i) }); err != nil {
			log.Fatalf("genkeys: writing %s: %v", *nginxPath, err)
		}
	}
}

// writeKeys writes the file beside its path and renames it into place, so
// that a server watching the path never reads half a file.
func writeKeys(path string, n, extra int) error {
	tmp := path + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return err
	}
	w := bufio.NewWriterSize(f, 1<<20)
	w.WriteString(`{"keys": [` + "\n")
	var hexBuf [64]byte
	for i := range n + extra {
		key, id := benchKey(i), fmt.Sprintf("k%d", i)
		if i >= n {
			key, id = "extra-"+benchKey(i), fmt.Sprintf("x%d", i)
		}
		sum := sha256.Sum256([]byte(key))
		hex.Encode(hexBuf[:], sum[:])
		if i > 0 {
			w.WriteString(",\n")
		}
		fmt.Fprintf(w, `{"id": %q, "hash": "sha256:%s"}`, id, hexBuf[:])
	}
	w.WriteString("\n]}\n")
	if err := w.Flush(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func writeLines(path string, n int, line func(int) string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	w := bufio.NewWriterSize(f, 1<<20)
	for i := range n {
		w.WriteString(line(i))
		w.WriteByte('\n')
	}
	if err := w.Flush(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
