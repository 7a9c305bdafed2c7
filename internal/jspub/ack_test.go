package jspub

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

var ackSamples = []string{
	`{"stream":"CELL_RZ00","seq":1}`,
	`{"stream":"CELL_RZ00","seq":18446744073709551615,"duplicate":true}`,
	`{"stream":"S","domain":"hub","seq":7,"duplicate":false}`,
	` {"Stream":"S" , "SEQ":2, "val":"x", "n":-1.5e3, "z":null, "t":true} `,
	`{"stream":"S","seq":18446744073709551616}`,
	`{"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 0"},"stream":"S","seq":0}`,
	`{"stream":"S\u0041","seq":1}`,
	`{"stream":"S","seq":01}`,
	`{"stream":"S","seq":1.0}`,
	`{"stream":"S","seq":1,}`,
	`{"stream":"S","seq":1} x`,
	`{"seq":1}`,
	`{}`,
	``,
	`{"stream":"S","batch":{"id":"b"},"seq":1}`,
	`{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}`,
	`{ "Error" : { "Code" : 400 , "ERR_CODE" : 10164 , "x" : true } }`,
	`{"error":{}}`,
	`{"error":null,"stream":"S","seq":1}`,
	`{"error":{"code":400,"err_code":65536}}`,
	`{"error":{"code":-1,"err_code":1}}`,
	`{"error":{"code":400,"err_code":1,"description":"caf\u00e9"}}`,
	`{"error":{"code":400},"error":{"err_code":2}}`,
	`{"error":{"code":400,"err_code":1,"nested":{}}}`,
	`{"error":{"code":400,"err_code":1,"description":"d"},"stream":"S","domain":"error"}`,
	`{"stream":"S","domain":"error","seq":3}`,
}

// The scanner reads the usual PubAck and refusal shapes itself and leaves
// the rest to encoding/json.
func TestScanAck(t *testing.T) {
	for _, c := range []struct {
		in string
		r  scanned
		ok bool
	}{
		{ackSamples[0], scanned{stream: []byte("CELL_RZ00"), seq: 1}, true},
		{ackSamples[1], scanned{stream: []byte("CELL_RZ00"), seq: 1<<64 - 1, dup: true}, true},
		{ackSamples[2], scanned{stream: []byte("S"), seq: 7}, true},
		{ackSamples[3], scanned{stream: []byte("S"), seq: 2}, true},
		{ackSamples[4], scanned{}, false}, // overflow
		{ackSamples[5], scanned{stream: []byte("S"), refused: true, code: 400, errCode: 10071, desc: []byte("wrong last sequence: 0")}, true},
		{ackSamples[6], scanned{}, false}, // escape
		{ackSamples[7], scanned{}, false}, // leading zero
		{ackSamples[8], scanned{}, false}, // fraction
		{ackSamples[9], scanned{}, false}, // trailing comma
		{ackSamples[10], scanned{}, false},
		{ackSamples[11], scanned{}, false}, // no stream
		{ackSamples[12], scanned{}, false},
		{ackSamples[13], scanned{}, false},
		{ackSamples[14], scanned{}, false}, // nested
		{ackSamples[15], scanned{refused: true, code: 503, errCode: 10077, desc: []byte("maximum messages exceeded")}, true},
		{ackSamples[16], scanned{refused: true, code: 400, errCode: 10164}, true},
		{ackSamples[17], scanned{refused: true}, true},
		{ackSamples[18], scanned{}, false}, // null error
		{ackSamples[19], scanned{}, false}, // err_code beyond uint16
		{ackSamples[20], scanned{}, false}, // negative code
		{ackSamples[21], scanned{}, false}, // escape in the description
		{ackSamples[22], scanned{}, false}, // repeated error
		{ackSamples[23], scanned{}, false}, // nested in the error
		{ackSamples[24], scanned{stream: []byte("S"), refused: true, code: 400, errCode: 1, desc: []byte("d")}, true},
		{ackSamples[25], scanned{stream: []byte("S"), seq: 3}, true},
	} {
		r, ok := scanAck([]byte(c.in))
		if ok != c.ok || string(r.stream) != string(c.r.stream) || r.seq != c.r.seq || r.dup != c.r.dup ||
			r.refused != c.r.refused || r.code != c.r.code || r.errCode != c.r.errCode || string(r.desc) != string(c.r.desc) {
			t.Errorf("scanAck(%s) = %+v %v, want %+v %v", c.in, r, ok, c.r, c.ok)
		}
	}
}

func TestScanAckAllocs(t *testing.T) {
	for _, s := range []string{ackSamples[2], ackSamples[5]} {
		b := []byte(s)
		if n := testing.AllocsPerRun(100, func() { scanAck(b) }); n != 0 {
			t.Fatalf("scanAck(%s) allocates %v times", s, n)
		}
	}
	m := &nats.Msg{Data: []byte(ackSamples[1])}
	if n := testing.AllocsPerRun(100, func() { _, _ = ReadAck(m) }); n != 0 {
		t.Fatalf("ReadAck of a duplicate ack allocates %v times", n)
	}
}

// FuzzScanAck checks that whenever the scanner accepts a reply,
// encoding/json reads the same stream, sequence, duplicate flag and error
// from it.
func FuzzScanAck(f *testing.F) {
	for _, s := range ackSamples {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		r, ok := scanAck(b)
		if !ok {
			return
		}
		var ack struct {
			Error     *jetstream.APIError `json:"error"`
			Stream    string              `json:"stream"`
			Sequence  uint64              `json:"seq"`
			Duplicate bool                `json:"duplicate"`
		}
		if err := json.Unmarshal(b, &ack); err != nil {
			t.Fatalf("scanner accepted %q, encoding/json: %v", b, err)
		}
		if ack.Stream != string(r.stream) || ack.Sequence != r.seq || ack.Duplicate != r.dup || (ack.Error != nil) != r.refused {
			t.Fatalf("scanner read %+v from %q, encoding/json %+v", r, b, ack)
		}
		if r.refused && (ack.Error.Code != r.code || uint16(ack.Error.ErrorCode) != r.errCode || ack.Error.Description != string(r.desc)) {
			t.Fatalf("scanner read error %d %d %q from %q, encoding/json %+v", r.code, r.errCode, r.desc, b, *ack.Error)
		}
		if !r.refused && len(r.stream) == 0 {
			t.Fatalf("scanner accepted %q without a stream", b)
		}
	})
}

// Each reply a stream (or the server) may give maps to the documented
// result.
func TestReadAck(t *testing.T) {
	status := func(code, descr string) nats.Header { return nats.Header{"Status": {code}, "Description": {descr}} }
	cases := []struct {
		name  string
		hdr   nats.Header
		data  string
		ack   Ack   // when no error
		want  error // errors.Is target
		code  jetstream.ErrorCode
		descr string // in the error
	}{
		{"stored", nil, `{"stream":"KV_b","seq":12}`, Ack{Stream: []byte("KV_b"), Seq: 12}, nil, 0, ""},
		{"stored in a domain called error", nil, `{"stream":"KV_b","domain":"error","seq":12}`, Ack{Stream: []byte("KV_b"), Seq: 12}, nil, 0, ""},
		{"duplicate", nil, `{"stream":"S","seq":4,"duplicate":true}`, Ack{Stream: []byte("S"), Seq: 4, Duplicate: true}, nil, 0, ""},
		{"escaped stream", nil, `{"stream":"F\u0041KE","seq":5,"duplicate":true}`, Ack{Stream: []byte("FAKE"), Seq: 5, Duplicate: true}, nil, 0, ""},
		{"wrong last sequence", nil, `{"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 5"},"stream":"KV_b","seq":0}`,
			Ack{}, nil, jetstream.JSErrCodeStreamWrongLastSequence, "wrong last sequence: 5"},
		{"wrong last sequence, replicated", nil, `{"error":{"code":400,"err_code":10164,"description":"wrong last sequence"}}`,
			Ack{}, nil, jetstream.JSErrCodeStreamWrongLastSequenceConstant, "wrong last sequence"},
		{"other API error", nil, `{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}`,
			Ack{}, nil, 10077, "maximum messages exceeded"},
		{"API error with an escape", nil, `{"error":{"code":400,"err_code":1,"description":"\"x\""}}`, Ack{}, nil, 1, `"x"`},
		{"no responders", status("503", ""), "", Ack{}, ErrNoStream, 0, ""},
		{"other status", status("408", "Request Timeout"), "", Ack{}, jetstream.ErrInvalidJSAck, 0, "Request Timeout"},
		{"no stream name", nil, `{"seq":1}`, Ack{}, jetstream.ErrInvalidJSAck, 0, ""},
		{"not json", nil, `ok`, Ack{}, jetstream.ErrInvalidJSAck, 0, ""},
		{"malformed", nil, `{"error":`, Ack{}, jetstream.ErrInvalidJSAck, 0, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ack, err := ReadAck(&nats.Msg{Header: tc.hdr, Data: []byte(tc.data)})
			if tc.want == nil && tc.code == 0 {
				if err != nil || string(ack.Stream) != string(tc.ack.Stream) || ack.Seq != tc.ack.Seq || ack.Duplicate != tc.ack.Duplicate {
					t.Fatalf("ReadAck = %+v, %v; want %+v", ack, err, tc.ack)
				}
				return
			}
			if err == nil {
				t.Fatalf("no error (ack %+v)", ack)
			}
			if tc.want != nil && !errors.Is(err, tc.want) {
				t.Fatalf("%v, want %v", err, tc.want)
			}
			var ae *jetstream.APIError
			if tc.code != 0 && (!errors.As(err, &ae) || ae.ErrorCode != tc.code) {
				t.Fatalf("%v, want API error code %d", err, tc.code)
			}
			if !strings.Contains(err.Error(), tc.descr) {
				t.Fatalf("%v, want it to say %q", err, tc.descr)
			}
		})
	}
	if !errors.Is(ErrNoStream, jetstream.ErrNoStreamResponse) || !errors.Is(ErrNoStream, nats.ErrNoResponders) {
		t.Fatalf("ErrNoStream = %v: wants both no-stream sentinels", ErrNoStream)
	}
}

func BenchmarkScanAck(b *testing.B) {
	ack := []byte(`{"stream":"CELL_RZ00","seq":123456789}`)
	for b.Loop() {
		scanAck(ack)
	}
}

func BenchmarkJSONAck(b *testing.B) {
	ack := []byte(`{"stream":"CELL_RZ00","seq":123456789}`)
	var v struct {
		Stream   string `json:"stream"`
		Sequence uint64 `json:"seq"`
	}
	for b.Loop() {
		_ = json.Unmarshal(ack, &v)
	}
}
