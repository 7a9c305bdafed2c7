package router

import (
	"fmt"
	"strings"
)

// KeyWildcard returns the 1-based ordinal, counted among the '*' tokens of
// the NATS subject filter, of the '*' at token position token (1 is the
// first token, -1 the last). That ordinal is what a stream subject
// transform's {{partition(n,i)}} and {{wildcard(i)}} take: their indexes
// count the source pattern's '*' wildcards, not its tokens. It fails, with
// a message naming the subject and the token, when that token is not a '*'
// (a literal, beyond the end, inside a final '>', or counted from the end
// of a filter that ends in '>').
func KeyWildcard(subject string, token int) (int, error) {
	toks := strings.Split(subject, ".")
	fwc := toks[len(toks)-1] == ">"
	idx := token - 1
	switch {
	case token == 0:
		return 0, fmt.Errorf("token 0 does not exist: 1 is the first token, -1 the last")
	case token < 0 && fwc:
		return 0, fmt.Errorf("token %d counts from the end, but the source subject %q ends in '>' (its length varies): give the position from the start", token, subject)
	case token < 0:
		idx = len(toks) + token
		if idx < 0 {
			return 0, fmt.Errorf("the source subject %q has only %d tokens, no token %d", subject, len(toks), token)
		}
	case fwc && idx >= len(toks)-1:
		return 0, fmt.Errorf("token %d of the source subject %q falls inside '>': write a '*' at that position, e.g. %q", token, subject, widen(toks, idx))
	case idx >= len(toks):
		return 0, fmt.Errorf("the source subject %q has only %d tokens, no token %d", subject, len(toks), token)
	}
	if toks[idx] != "*" {
		return 0, fmt.Errorf("token %d of the source subject %q is %q, not '*': a stream can partition only on a wildcard token", token, subject, toks[idx])
	}
	n := 0
	for _, t := range toks[:idx+1] {
		if t == "*" {
			n++
		}
	}
	return n, nil
}

// widen suggests a filter with '*' up to token idx, keeping a final '>'.
func widen(toks []string, idx int) string {
	out := append([]string(nil), toks[:len(toks)-1]...)
	for len(out) <= idx {
		out = append(out, "*")
	}
	return strings.Join(append(out, ">"), ".")
}

// Partition returns the partition of key among n partitions (n > 0): the
// 32-bit FNV-1a hash of the key's bytes modulo n. It is what nats-server's
// {{partition(n,i)}} subject transform function computes for a single
// token, so it names the partition a stream stores an event in.
func Partition(key string, n int) int {
	return int(fnv1a32(key) % uint32(n))
}

// Partition returns the partition the rule's stream stores an event with
// this key in, or -1 when the rule is not partitioned.
func (r *Rule) Partition(key string) int {
	if r.Source.Partitions <= 0 {
		return -1
	}
	return Partition(key, r.Source.Partitions)
}

func fnv1a32(key string) uint32 {
	h := uint32(2166136261)
	for i := 0; i < len(key); i++ {
		h ^= uint32(key[i])
		h *= 16777619
	}
	return h
}
