package natsjs

import (
	"testing"
	"time"

	"github.com/nats-io/nats.go"
)

var ackSubjects = []string{
	"$JS.ACK.ORDERS.cellbridge-orders.1.1234.17.1795633843734909951.42",
	"$JS.ACK._.hash.ORDERS.c.3.7.7.1795633843734909951.0",
	"$JS.ACK.hub.hash.ORDERS.c.3.7.7.1795633843734909951.0.rand",
	"$JS.ACK.hub.hash.ORDERS.c.3.7.7.1795633843734909951.0.rand.more",
	"$JS.ACK.ORDERS.c.x.7.7.1.0",
	"$JS.ACK.ORDERS.c.1.7.7.1",
	"$JS.ACK.a.b.ORDERS.c.1.7.7.1.2",
	"$JS.NAK.ORDERS.c.1.7.7.1.2",
	"",
	"........",
}

// checkAgainstLibrary compares parseAck with the client library's parser.
func checkAgainstLibrary(t *testing.T, s string) {
	t.Helper()
	want, err := (&nats.Msg{Reply: s, Sub: &nats.Subscription{}}).Metadata()
	got, ok := parseAck(s)
	if ok != (err == nil) {
		t.Fatalf("parseAck(%q) ok=%v, library err=%v", s, ok, err)
	}
	if !ok {
		return
	}
	if got.stream != want.Stream || got.seq != want.Sequence.Stream || got.delivered != want.NumDelivered ||
		got.pending != want.NumPending || !time.Unix(0, got.timestamp).Equal(want.Timestamp) {
		t.Fatalf("parseAck(%q) = %+v, library %+v", s, got, want)
	}
}

func TestParseAck(t *testing.T) {
	for _, s := range ackSubjects {
		checkAgainstLibrary(t, s)
	}
	m, ok := parseAck(ackSubjects[0])
	if !ok || m.stream != "ORDERS" || m.streamSeq != "1234" || m.seq != 1234 || m.delivered != 1 || m.pending != 42 {
		t.Fatalf("parseAck = %+v, %v", m, ok)
	}
	if n := testing.AllocsPerRun(100, func() { parseAck(ackSubjects[2]) }); n != 0 {
		t.Fatalf("parseAck allocates %v times", n)
	}
}

func FuzzParseAck(f *testing.F) {
	for _, s := range ackSubjects {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) { checkAgainstLibrary(t, s) })
}

func BenchmarkParseAck(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		m, _ := parseAck(ackSubjects[0])
		_ = sourceID(nil, &m)
	}
}

// BenchmarkParseAckLibrary is the client library's parser on the same
// subject, for comparison.
func BenchmarkParseAckLibrary(b *testing.B) {
	m := &nats.Msg{Reply: ackSubjects[0], Sub: &nats.Subscription{}}
	b.ReportAllocs()
	for b.Loop() {
		meta, _ := m.Metadata()
		_ = meta.Stream
	}
}
