package natsjs

import (
	"hash/fnv"
	"slices"
	"strings"
)

// Assign spreads n partitions over the live members of a rule: owner[p] is
// the member that should hold partition p. It is a pure function of the
// member set (order and duplicates of members do not matter), so every
// replica that sees the same members computes the same assignment without
// talking to the others. It returns nil when there are no members or
// partitions.
//
// Balanced: every member gets ⌊n/m⌋ or ⌈n/m⌉ partitions (m members), so
// owned counts differ by at most one. Few moves: each (member, partition)
// pair has a pseudo-random score (rendezvous hashing), and pairs are taken
// in descending score order, a pair being skipped when its partition is
// taken or its member is full (a plain capacity of ⌈n/m⌉ would not do:
// 12 partitions over 5 members could end 3,3,3,3,0). A member joining or
// leaving moves mostly the partitions it wins or loses: on average 0.5 to
// 1.6 partitions more than the fewest any balanced assignment could move
// for 12 partitions and 2 to 9 members (TestAssignMoves). The scores are
// part of the protocol between replicas: the replicas of one rule must run
// the same function.
func Assign(members []string, n int) []string {
	ms := slices.Clone(members)
	slices.Sort(ms)
	ms = slices.Compact(ms)
	m := len(ms)
	if m == 0 || n <= 0 {
		return nil
	}
	type pair struct {
		score  uint64
		member int32
		part   int32
	}
	pairs := make([]pair, 0, m*n)
	for mi, id := range ms {
		h := fnv1a64(id)
		for p := range n {
			pairs = append(pairs, pair{score: mix64(h ^ mix64(uint64(p)+0x9e3779b97f4a7c15)), member: int32(mi), part: int32(p)})
		}
	}
	slices.SortFunc(pairs, func(a, b pair) int {
		switch {
		case a.score != b.score:
			if a.score > b.score {
				return -1
			}
			return 1
		case a.member != b.member:
			return int(a.member - b.member)
		default:
			return int(a.part - b.part)
		}
	})
	// q partitions each, and r of the members one more: the first r
	// members to reach q+1 keep it, the others stop at q.
	q, r := n/m, n%m
	owner := make([]int32, n)
	for i := range owner {
		owner[i] = -1
	}
	count := make([]int, m)
	big, left := 0, n
	for _, pr := range pairs {
		if left == 0 {
			break
		}
		if owner[pr.part] >= 0 {
			continue
		}
		limit := q
		if big < r {
			limit = q + 1
		}
		if count[pr.member] >= limit {
			continue
		}
		owner[pr.part] = pr.member
		count[pr.member]++
		left--
		if count[pr.member] == q+1 {
			big++
		}
	}
	out := make([]string, n)
	for p, mi := range owner {
		out[p] = ms[mi]
	}
	return out
}

// fnv1a64 is the 64-bit FNV-1a hash of s.
func fnv1a64(s string) uint64 {
	h := fnv.New64a()
	_, _ = h.Write([]byte(s))
	return h.Sum64()
}

// mix64 is the splitmix64 finaliser: it spreads FNV's weak low bits over
// the whole word, so that scores of one member for neighbouring partitions
// are unrelated.
func mix64(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}

// validReplicaID reports whether id can be a KV key token: letters,
// digits, '_' and '-' (KV keys also allow '/', '=' and '.', but a '.'
// would make the member key's last token ambiguous).
func validReplicaID(id string) bool {
	return id != "" && len(id) <= 128 && strings.IndexFunc(id, func(c rune) bool {
		return !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-')
	}) < 0
}
