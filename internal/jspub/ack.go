package jspub

import (
	"encoding/json"
	"fmt"
	"math"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Ack is a JetStream publish acknowledgement (PubAck): the stream stored the
// message at Seq, or, with Duplicate, dropped it as a repeat of the message
// stored at Seq with the same Nats-Msg-Id inside its duplicate window.
type Ack struct {
	// Stream names the stream. It aliases the reply's data (copy it to
	// keep it beyond the reply).
	Stream    []byte
	Seq       uint64
	Duplicate bool
}

// Status headers: a reply with an empty body and a Status header is a
// server status, not a PubAck ("503": nothing listens on the subject).
const (
	statusHdr          = "Status"
	descrHdr           = "Description"
	statusNoResponders = "503"
)

// ReadAck reads the reply to a JetStream publish. It returns the Ack when
// the stream stored the message or dropped it as a duplicate, and otherwise
// an error: ErrNoStream when nothing captured the subject; the server's
// *jetstream.APIError when the stream refused the message (for instance
// jetstream.JSErrCodeStreamWrongLastSequence for a failed expected-sequence
// check); one wrapping jetstream.ErrInvalidJSAck for any other status or a
// reply that is not a PubAck. The usual replies, stored or refused, are read
// without encoding/json; a stored or duplicate ack allocates nothing.
func ReadAck(m *nats.Msg) (Ack, error) {
	if len(m.Data) == 0 {
		if st := m.Header.Get(statusHdr); st != "" {
			if st == statusNoResponders {
				return Ack{}, ErrNoStream
			}
			return Ack{}, fmt.Errorf("server status %s %q: %w", st, m.Header.Get(descrHdr), jetstream.ErrInvalidJSAck)
		}
	}
	if r, ok := scanAck(m.Data); ok {
		if r.refused {
			return Ack{}, &jetstream.APIError{Code: r.code, ErrorCode: jetstream.ErrorCode(r.errCode), Description: string(r.desc)}
		}
		return Ack{Stream: r.stream, Seq: r.seq, Duplicate: r.dup}, nil
	}
	// Escapes, nested values and shapes the scanner does not know: the
	// rare path.
	var ack struct {
		Error     *jetstream.APIError `json:"error"`
		Stream    string              `json:"stream"`
		Sequence  uint64              `json:"seq"`
		Duplicate bool                `json:"duplicate"`
	}
	if err := json.Unmarshal(m.Data, &ack); err != nil {
		return Ack{}, fmt.Errorf("%w: %w", jetstream.ErrInvalidJSAck, err)
	}
	switch {
	case ack.Error != nil:
		return Ack{}, ack.Error
	case ack.Stream == "":
		return Ack{}, fmt.Errorf("no stream named: %w", jetstream.ErrInvalidJSAck)
	}
	return Ack{Stream: []byte(ack.Stream), Seq: ack.Sequence, Duplicate: ack.Duplicate}, nil
}

// scanned is what scanAck read: a PubAck, or (refused) the stream's error.
type scanned struct {
	stream  []byte
	seq     uint64
	dup     bool
	refused bool // an "error" member was present
	code    int
	errCode uint16
	desc    []byte
}

// scanAck reads a reply of the usual shapes without encoding/json (which
// costs more than the rest of handling a reply): a PubAck
// {"stream":"S","seq":N} with optional "duplicate", "domain" and other
// scalar members, or a refusal carrying "error":{"code":C,"err_code":E,
// "description":"D"} (with any scalar members besides). ok is false for
// anything else (escapes or non-ASCII in strings, other nested values, a
// repeated "error", a null, negative or out-of-range code, malformed JSON, a
// PubAck with no stream): the caller then decodes with encoding/json, which
// gives the same answer whenever ok is true. Keys match case-insensitively,
// as encoding/json matches them. stream and desc alias b.
func scanAck(b []byte) (r scanned, ok bool) {
	i := skipSpace(b, 0)
	if i >= len(b) || b[i] != '{' {
		return scanned{}, false
	}
	i = skipSpace(b, i+1)
	if i < len(b) && b[i] == '}' {
		return scanned{}, false // no stream
	}
	for {
		var key []byte
		if key, i, ok = scanString(b, i); !ok {
			return scanned{}, false
		}
		if i, ok = colon(b, i); !ok {
			return scanned{}, false
		}
		switch {
		case equalFold(key, "stream"):
			if r.stream, i, ok = scanString(b, i); !ok {
				return scanned{}, false
			}
		case equalFold(key, "seq"):
			if r.seq, i, ok = scanUint(b, i); !ok {
				return scanned{}, false
			}
		case equalFold(key, "duplicate"):
			if r.dup, i, ok = scanBool(b, i); !ok {
				return scanned{}, false
			}
		case equalFold(key, "error"):
			// A second "error" would be merged into the first by
			// encoding/json: left to it.
			if r.refused {
				return scanned{}, false
			}
			r.refused = true
			if i, ok = scanAPIError(b, i, &r); !ok {
				return scanned{}, false
			}
		default:
			if i, ok = skipScalar(b, i); !ok {
				return scanned{}, false
			}
		}
		var end bool
		if i, end, ok = next(b, i); !ok {
			return scanned{}, false
		}
		if end {
			break
		}
	}
	if skipSpace(b, i) != len(b) || (!r.refused && len(r.stream) == 0) {
		return scanned{}, false
	}
	return r, true
}

// scanAPIError reads the object of an "error" member at b[i] into r.
func scanAPIError(b []byte, i int, r *scanned) (int, bool) {
	if i >= len(b) || b[i] != '{' {
		return i, false // null, or not an object
	}
	i = skipSpace(b, i+1)
	if i < len(b) && b[i] == '}' {
		return i + 1, true
	}
	for {
		key, j, ok := scanString(b, i)
		if !ok {
			return i, false
		}
		if i, ok = colon(b, j); !ok {
			return i, false
		}
		switch {
		case equalFold(key, "code"):
			var v uint64
			if v, i, ok = scanUint(b, i); !ok || v > math.MaxInt64 {
				return i, false
			}
			r.code = int(v)
		case equalFold(key, "err_code"):
			var v uint64
			if v, i, ok = scanUint(b, i); !ok || v > math.MaxUint16 {
				return i, false
			}
			r.errCode = uint16(v)
		case equalFold(key, "description"):
			if r.desc, i, ok = scanString(b, i); !ok {
				return i, false
			}
		default:
			if i, ok = skipScalar(b, i); !ok {
				return i, false
			}
		}
		var end bool
		if i, end, ok = next(b, i); !ok {
			return i, false
		}
		if end {
			return i, true
		}
	}
}

// colon skips the ':' after a key and the space around it.
func colon(b []byte, i int) (int, bool) {
	i = skipSpace(b, i)
	if i >= len(b) || b[i] != ':' {
		return i, false
	}
	return skipSpace(b, i+1), true
}

// next reads what follows a member: ',' (end false, i at the next key) or
// '}' (end true, i just past it).
func next(b []byte, i int) (int, bool, bool) {
	i = skipSpace(b, i)
	if i >= len(b) {
		return i, false, false
	}
	switch b[i] {
	case '}':
		return i + 1, true, true
	case ',':
		return skipSpace(b, i+1), false, true
	}
	return i, false, false
}

func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}

// scanString reads a string of printable ASCII without escapes at b[i].
func scanString(b []byte, i int) ([]byte, int, bool) {
	if i >= len(b) || b[i] != '"' {
		return nil, i, false
	}
	for j := i + 1; j < len(b); j++ {
		c := b[j]
		if c == '"' {
			return b[i+1 : j], j + 1, true
		}
		if c < 0x20 || c >= 0x80 || c == '\\' {
			return nil, i, false
		}
	}
	return nil, i, false
}

// scanUint reads a JSON integer that fits a uint64 at b[i].
func scanUint(b []byte, i int) (uint64, int, bool) {
	j := i
	var n uint64
	for j < len(b) && b[j] >= '0' && b[j] <= '9' {
		d := uint64(b[j] - '0')
		if n > (1<<64-1-d)/10 {
			return 0, i, false
		}
		n = n*10 + d
		j++
	}
	if j == i || (b[i] == '0' && j > i+1) {
		return 0, i, false // none, or a leading zero
	}
	if j < len(b) && (b[j] == '.' || b[j] == 'e' || b[j] == 'E') {
		return 0, i, false
	}
	return n, j, true
}

// scanBool reads true or false at b[i].
func scanBool(b []byte, i int) (bool, int, bool) {
	switch {
	case hasLiteral(b, i, "true"):
		return true, i + 4, true
	case hasLiteral(b, i, "false"):
		return false, i + 5, true
	}
	return false, i, false
}

// skipScalar skips a string, number, true, false or null at b[i].
func skipScalar(b []byte, i int) (int, bool) {
	if i >= len(b) {
		return i, false
	}
	switch c := b[i]; {
	case c == '"':
		_, j, ok := scanString(b, i)
		return j, ok
	case hasLiteral(b, i, "true"), hasLiteral(b, i, "null"):
		return i + 4, true
	case hasLiteral(b, i, "false"):
		return i + 5, true
	case c == '-' || (c >= '0' && c <= '9'):
		return skipNumber(b, i)
	}
	return i, false
}

// skipNumber skips a number of JSON's grammar at b[i].
func skipNumber(b []byte, i int) (int, bool) {
	digits := func(j int) int {
		for j < len(b) && b[j] >= '0' && b[j] <= '9' {
			j++
		}
		return j
	}
	j := i
	if b[j] == '-' {
		j++
	}
	switch {
	case j < len(b) && b[j] == '0':
		j++
	case j < len(b) && b[j] >= '1' && b[j] <= '9':
		j = digits(j)
	default:
		return i, false
	}
	if j < len(b) && b[j] == '.' {
		k := digits(j + 1)
		if k == j+1 {
			return i, false
		}
		j = k
	}
	if j < len(b) && (b[j] == 'e' || b[j] == 'E') {
		j++
		if j < len(b) && (b[j] == '+' || b[j] == '-') {
			j++
		}
		k := digits(j)
		if k == j {
			return i, false
		}
		j = k
	}
	return j, true
}

func hasLiteral(b []byte, i int, lit string) bool {
	return len(b)-i >= len(lit) && string(b[i:i+len(lit)]) == lit
}

// equalFold reports whether the ASCII key equals name (lower case) ignoring
// case; keys are ASCII here, so this matches encoding/json's folding.
func equalFold(key []byte, name string) bool {
	if len(key) != len(name) {
		return false
	}
	for i := range key {
		c := key[i]
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		if c != name[i] {
			return false
		}
	}
	return true
}
