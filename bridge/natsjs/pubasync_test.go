package natsjs

import (
	"encoding/json"
	"testing"
)

var pubAckSamples = []string{
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
}

// The scanner reads the usual PubAck shapes itself and leaves the rest to
// encoding/json.
func TestScanPubAck(t *testing.T) {
	for _, c := range []struct {
		in     string
		stream string
		seq    uint64
		dup    bool
		ok     bool
	}{
		{pubAckSamples[0], "CELL_RZ00", 1, false, true},
		{pubAckSamples[1], "CELL_RZ00", 1<<64 - 1, true, true},
		{pubAckSamples[2], "S", 7, false, true},
		{pubAckSamples[3], "S", 2, false, true},
		{pubAckSamples[4], "", 0, false, false}, // overflow
		{pubAckSamples[5], "", 0, false, false}, // error
		{pubAckSamples[6], "", 0, false, false}, // escape
		{pubAckSamples[7], "", 0, false, false}, // leading zero
		{pubAckSamples[8], "", 0, false, false}, // fraction
		{pubAckSamples[9], "", 0, false, false}, // trailing comma
		{pubAckSamples[10], "", 0, false, false},
		{pubAckSamples[11], "", 0, false, false}, // no stream
		{pubAckSamples[12], "", 0, false, false},
		{pubAckSamples[13], "", 0, false, false},
		{pubAckSamples[14], "", 0, false, false}, // nested
	} {
		stream, seq, dup, ok := scanPubAck([]byte(c.in))
		if string(stream) != c.stream || seq != c.seq || dup != c.dup || ok != c.ok {
			t.Errorf("scanPubAck(%s) = %q %d %v %v, want %q %d %v %v", c.in, stream, seq, dup, ok, c.stream, c.seq, c.dup, c.ok)
		}
	}
}

func TestScanPubAckAllocs(t *testing.T) {
	b := []byte(pubAckSamples[2])
	if n := testing.AllocsPerRun(100, func() { scanPubAck(b) }); n != 0 {
		t.Fatalf("scanPubAck allocates %v times", n)
	}
}

// FuzzScanPubAck checks that whenever the scanner accepts an ack,
// encoding/json reads the same stream, sequence and duplicate flag from it
// and sees no error member.
func FuzzScanPubAck(f *testing.F) {
	for _, s := range pubAckSamples {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		stream, seq, dup, ok := scanPubAck(b)
		if !ok {
			return
		}
		var ack struct {
			Error     json.RawMessage `json:"error"`
			Stream    string          `json:"stream"`
			Sequence  uint64          `json:"seq"`
			Duplicate bool            `json:"duplicate"`
		}
		if err := json.Unmarshal(b, &ack); err != nil {
			t.Fatalf("scanner accepted %q, encoding/json: %v", b, err)
		}
		if ack.Error != nil || ack.Stream != string(stream) || ack.Sequence != seq || ack.Duplicate != dup {
			t.Fatalf("scanner read %q %d %v from %q, encoding/json %+v", stream, seq, dup, b, ack)
		}
	})
}

func BenchmarkScanPubAck(b *testing.B) {
	ack := []byte(`{"stream":"CELL_RZ00","seq":123456789}`)
	for b.Loop() {
		scanPubAck(ack)
	}
}

func BenchmarkJSONPubAck(b *testing.B) {
	ack := []byte(`{"stream":"CELL_RZ00","seq":123456789}`)
	var v struct {
		Stream   string `json:"stream"`
		Sequence uint64 `json:"seq"`
	}
	for b.Loop() {
		_ = json.Unmarshal(ack, &v)
	}
}
