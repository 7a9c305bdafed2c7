package rmqtest

import (
	"bytes"
	"fmt"
	"testing"
	"time"

	"github.com/apache/rocketmq-client-go/v2/primitive"
)

func TestSendReceive(t *testing.T) {
	b := startBroker(t, Options{})
	p := newProducer(t, b, "pg-basic")
	const topic = "basic"
	// The first send auto-creates the topic through the TBW102 default route.
	for i := range 10 {
		m := primitive.NewMessage(topic, []byte(fmt.Sprintf("single-%d", i)))
		m.WithTag("tA")
		m.WithKeys([]string{fmt.Sprintf("k%d", i)})
		m.WithProperty("X-User", fmt.Sprint(i))
		p.send(t, m)
	}
	var batch []*primitive.Message
	for i := range 5 {
		m := primitive.NewMessage(topic, []byte(fmt.Sprintf("batch-%d", i)))
		m.WithTag("tB")
		m.WithKeys([]string{fmt.Sprintf("b%d", i)})
		batch = append(batch, m)
	}
	p.send(t, batch...)
	// Bodies over 4 KiB travel zlib-compressed (sysFlag bit 0).
	big := bytes.Repeat([]byte("large-"), 2000)
	p.send(t, primitive.NewMessage(topic, big))
	stored := b.Messages(topic)
	if len(stored) != 16 {
		t.Fatalf("stored %d messages, want 16", len(stored))
	}
	for _, m := range stored {
		if len(m.Body) == len(big) && (!bytes.Equal(m.Body, big) || m.SysFlag&1 == 0) {
			t.Fatalf("large body: sysFlag %d, equal %v", m.SysFlag, bytes.Equal(m.Body, big))
		}
	}

	var r received
	newConsumer(t, b, "cg-basic", topic, "*", &r)
	eventually(t, 15*time.Second, "16 messages", func() bool { return r.count() >= 16 })
	seen := map[string]*primitive.MessageExt{}
	for _, m := range r.snapshot() {
		seen[string(m.Body)] = m
	}
	if len(seen) != 16 || seen[string(big)] == nil {
		t.Fatalf("got %d distinct bodies, want 16 with the large one", len(seen))
	}
	m := seen["single-3"]
	if m.GetTags() != "tA" || m.GetKeys() != "k3" || m.GetProperty("X-User") != "3" {
		t.Fatalf("properties lost: tags %q keys %q props %v", m.GetTags(), m.GetKeys(), m.GetProperties())
	}
	if m.MsgId == "" || m.MsgId != m.GetProperty("UNIQ_KEY") {
		t.Fatalf("MsgId %q, UNIQ_KEY %q", m.MsgId, m.GetProperty("UNIQ_KEY"))
	}
	if m.StoreHost != b.BrokerAddr() || m.BornTimestamp == 0 || m.StoreTimestamp == 0 {
		t.Fatalf("store host %q born %d store %d", m.StoreHost, m.BornTimestamp, m.StoreTimestamp)
	}
	if bm := seen["batch-2"]; bm.GetTags() != "tB" || bm.GetKeys() != "b2" {
		t.Fatalf("batch properties lost: %v", bm.GetProperties())
	}
}
