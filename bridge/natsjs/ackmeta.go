package natsjs

import "strings"

// ackMeta is the part of a JetStream delivery's metadata the source uses.
// The library's Metadata() returns the same facts but allocates a struct
// per message and does more work than the hot path needs; parseAck reads
// them straight from the ack subject, with no allocation (the strings are
// substrings of it).
type ackMeta struct {
	stream    string
	streamSeq string // decimal, as in the subject
	seq       uint64
	dseq      uint64 // the consumer's delivery sequence
	delivered uint64
	pending   uint64
	timestamp int64 // UnixNano
}

// parseAck parses an ack subject exactly as the client library does:
//
//	$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<tm>.<pending>
//	$JS.ACK.<domain>.<acc hash>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<tm>.<pending>[.<token>...]
//
// (9 tokens, or 11 and more). Like the library it reads a malformed number
// as 0. ok is false when the subject has neither shape.
func parseAck(subject string) (m ackMeta, ok bool) {
	n := strings.Count(subject, ".") + 1
	if n < 9 || (n > 9 && n < 11) || !strings.HasPrefix(subject, "$JS.ACK.") {
		return m, false
	}
	rest := subject[len("$JS.ACK."):]
	if n > 9 { // skip the domain and the account hash
		_, rest, _ = strings.Cut(rest, ".")
		_, rest, _ = strings.Cut(rest, ".")
	}
	var t [7]string // stream consumer delivered sseq cseq tm pending
	for i := range t {
		t[i], rest, _ = strings.Cut(rest, ".")
	}
	m.stream, m.streamSeq = t[0], t[3]
	m.seq = parseNum(t[3])
	m.dseq = parseNum(t[4])
	m.delivered = parseNum(t[2])
	m.timestamp = int64(parseNum(t[5]))
	m.pending = parseNum(t[6])
	return m, true
}

// parseNum reads a decimal; anything but digits yields 0 (the library's
// rule, kept so that both parsers agree).
func parseNum(d string) (n uint64) {
	for i := 0; i < len(d); i++ {
		c := d[i]
		if c < '0' || c > '9' {
			return 0
		}
		n = n*10 + uint64(c-'0')
	}
	return n
}
