package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"
)

// cellTable is the benchmark's own reading of the CellMap in the rules
// directory: shard → cell. The bare pipe and watermill variants route with it
// inline ("no rules engine"), and verification checks every forwarded message
// against it, so all variants are held to the same rule file.
type cellTable struct {
	shards  int
	byShard []string // shard → cell name
	cells   []string // cells that own at least one shard, sorted
	global  string
	subject []string // shard → "cell.<cell>.orders"
}

// loadCellTable reads the CellMap document of dir. Only the parts the
// benchmark needs are read: shards, cells and their shard ranges.
func loadCellTable(dir string) (*cellTable, error) {
	files, err := filepath.Glob(filepath.Join(dir, "*.yaml"))
	if err != nil {
		return nil, err
	}
	type cell struct {
		Name   string   `yaml:"name"`
		Shards []string `yaml:"shards"`
	}
	type doc struct {
		Kind   string `yaml:"kind"`
		Shards int    `yaml:"shards"`
		Global string `yaml:"global"`
		Cells  []cell `yaml:"cells"`
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			return nil, err
		}
		dec := yaml.NewDecoder(bytes.NewReader(b))
		for {
			var d doc
			if err := dec.Decode(&d); err != nil {
				if errors.Is(err, io.EOF) {
					break
				}
				return nil, fmt.Errorf("%s: %w", f, err)
			}
			if d.Kind != "CellMap" {
				continue
			}
			t := &cellTable{shards: d.Shards, byShard: make([]string, d.Shards), global: d.Global}
			seen := map[string]bool{}
			for _, c := range d.Cells {
				for _, r := range c.Shards {
					lo, hi, ok := strings.Cut(r, "-")
					if !ok {
						hi = lo
					}
					a, err1 := strconv.Atoi(lo)
					z, err2 := strconv.Atoi(hi)
					if err1 != nil || err2 != nil || a < 0 || z >= d.Shards || a > z {
						return nil, fmt.Errorf("%s: cell %s: bad shard range %q", f, c.Name, r)
					}
					for s := a; s <= z; s++ {
						t.byShard[s] = c.Name
					}
					if !seen[c.Name] {
						seen[c.Name] = true
						t.cells = append(t.cells, c.Name)
					}
				}
			}
			t.subject = make([]string, d.Shards)
			for s, c := range t.byShard {
				if c == "" {
					return nil, fmt.Errorf("%s: shard %d has no cell", f, s)
				}
				t.subject[s] = "cell." + c + ".orders"
			}
			sort.Strings(t.cells)
			if len(t.cells) < 2 {
				return nil, fmt.Errorf("%s: the benchmark needs at least two cells", f)
			}
			return t, nil
		}
	}
	return nil, fmt.Errorf("%s: no CellMap document", dir)
}

// shardOf applies the rule `digits from -3 to -1`: the 3rd- and
// 2nd-to-last digits of the key. ok is false for keys that are too short or
// not digits there.
func shardOf(id []byte) (int, bool) {
	n := len(id)
	if n < 3 {
		return 0, false
	}
	a, b := id[n-3], id[n-2]
	if a < '0' || a > '9' || b < '0' || b > '9' {
		return 0, false
	}
	return int(a-'0')*10 + int(b-'0'), true
}

// streamOf names the JetStream stream that captures a cell's subjects.
func streamOf(cell string) string { return "CELL_" + strings.ToUpper(cell) }

// event is one generated order event.
type event struct {
	id   string // Nats-Msg-Id the producer sets: "o-<order>"
	body []byte
	user string
}

// genEvents makes n ~100-byte JSON order events with varying 16-digit user ids
// ("2088" + 12 random digits), reproducibly from seed.
func genEvents(n int, seed uint64) []event {
	r := rand.New(rand.NewPCG(seed, 0x9e3779b97f4a7c15))
	out := make([]event, n)
	for i := range out {
		user := fmt.Sprintf("2088%012d", r.Int64N(1_000_000_000_000))
		body := fmt.Sprintf(`{"user":{"id":"%s"},"order":%d,"amount":%d,"currency":"CNY","sku":"SKU-%05d"}`,
			user, i, 100+r.IntN(99900), r.IntN(100000))
		out[i] = event{id: "o-" + strconv.Itoa(i), body: []byte(body), user: user}
	}
	return out
}

// parseEvent pulls the order number and user id out of a forwarded body
// without a JSON decoder (verification reads every message of every run).
func parseEvent(b []byte) (order int, user []byte, ok bool) {
	const ku, ko = `"id":"`, `"order":`
	i := bytes.Index(b, []byte(ku))
	if i < 0 {
		return 0, nil, false
	}
	rest := b[i+len(ku):]
	j := bytes.IndexByte(rest, '"')
	if j < 0 {
		return 0, nil, false
	}
	user = rest[:j]
	k := bytes.Index(b, []byte(ko))
	if k < 0 {
		return 0, nil, false
	}
	p := k + len(ko)
	for p < len(b) && b[p] >= '0' && b[p] <= '9' && p-k-len(ko) < 9 {
		order = order*10 + int(b[p]-'0')
		p++
	}
	if p == k+len(ko) {
		return 0, nil, false
	}
	return order, user, true
}

// orderOfMsgID reads the order number back from an "o-<order>" id; -1 if the
// id has another shape.
func orderOfMsgID(id string) int {
	s, ok := strings.CutPrefix(id, "o-")
	if !ok {
		return -1
	}
	n, err := strconv.Atoi(s)
	if err != nil {
		return -1
	}
	return n
}
