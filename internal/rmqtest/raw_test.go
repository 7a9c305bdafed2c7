package rmqtest

import (
	"encoding/json"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"
)

// rawClient speaks the remoting protocol directly, for request codes and answers the Go client hides
// (pull status codes, locks, ROCKETMQ-serialized headers).
type rawClient struct {
	t  testing.TB
	nc net.Conn
	op int32
}

func dialRaw(t testing.TB, addr string) *rawClient {
	t.Helper()
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	return &rawClient{t: t, nc: nc}
}

func (r *rawClient) call(code int16, ext map[string]string, body []byte, serialize byte) *command {
	r.t.Helper()
	r.op++
	req := &command{Code: code, Language: "GO", Version: 317, Opaque: r.op, ExtFields: ext, Body: body, serialize: serialize}
	frame, err := encodeFrame(req)
	if err != nil {
		r.t.Fatal(err)
	}
	_ = r.nc.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := r.nc.Write(frame); err != nil {
		r.t.Fatal(err)
	}
	for {
		resp, err := readFrame(r.nc)
		if err != nil {
			r.t.Fatal(err)
		}
		if resp.isResponse() && resp.Opaque == req.Opaque {
			if resp.serialize != serialize {
				r.t.Fatalf("answer serialized as %d, request as %d", resp.serialize, serialize)
			}
			return resp
		}
	}
}

func TestRawPullCodes(t *testing.T) {
	b := startBroker(t, Options{})
	if err := b.CreateTopic("raw", 1); err != nil {
		t.Fatal(err)
	}
	for _, ser := range []byte{serializeJSON, serializeRocketMQ} {
		rc := dialRaw(t, b.BrokerAddr())
		pull := func(offset int64, sysFlag int, sub string) *command {
			return rc.call(reqPullMessage, map[string]string{
				"consumerGroup": "g", "topic": "raw", "queueId": "0", "queueOffset": strconv.FormatInt(offset, 10),
				"maxMsgNums": "32", "sysFlag": strconv.Itoa(sysFlag), "commitOffset": "0",
				"suspendTimeoutMillis": "100", "subscription": sub, "expressionType": "TAG",
			}, nil, ser)
		}
		base := b.QueueOffsets("raw")[0]
		if r := pull(base, 0, ""); r.Code != resPullNotFound || r.ext("nextBeginOffset") != strconv.FormatInt(base, 10) {
			t.Fatalf("empty queue: %v", r)
		}
		// Held pull (suspend flag) answers 19 after the suspend time.
		if r := pull(base, 2, ""); r.Code != resPullNotFound {
			t.Fatalf("held pull: %v", r)
		}
		send := rc.call(reqSendMessage, map[string]string{
			"producerGroup": "p", "topic": "raw", "queueId": "0", "sysFlag": "0", "bornTimestamp": "1",
			"flag": "0", "properties": "TAGS\x01x\x02", "reconsumeTimes": "0",
		}, []byte("hello"), ser)
		if send.Code != resSuccess || send.ext("queueOffset") != strconv.FormatInt(base, 10) {
			t.Fatalf("send: %v", send)
		}
		if r := pull(base, 4, "y || z"); r.Code != resPullRetryImmediate || r.ext("nextBeginOffset") != strconv.FormatInt(base+1, 10) {
			t.Fatalf("no match: %v", r)
		}
		r := pull(base, 4, "x")
		if r.Code != resSuccess || r.ext("maxOffset") != strconv.FormatInt(base+1, 10) || len(r.Body) == 0 {
			t.Fatalf("found: %v", r)
		}
		if r := pull(base+5, 0, ""); r.Code != resPullOffsetMoved || r.ext("nextBeginOffset") != strconv.FormatInt(base+1, 10) {
			t.Fatalf("offset too big: %v", r)
		}
		if r := rc.call(reqQueryConsumerOffset, map[string]string{"consumerGroup": "new", "topic": "raw", "queueId": "0"}, nil, ser); r.Code != resSuccess || r.ext("offset") != "0" {
			t.Fatalf("query offset of a new group: %v", r)
		}
		if r := rc.call(reqQueryConsumerOffset, map[string]string{"consumerGroup": "new", "topic": "nope", "queueId": "0"}, nil, ser); r.Code != resQueryNotFound {
			t.Fatalf("query offset of an unknown topic: %v", r)
		}
		if r := rc.call(reqGetMaxOffset, map[string]string{"topic": "raw", "queueId": "0"}, nil, ser); r.ext("offset") != strconv.FormatInt(base+1, 10) {
			t.Fatalf("max offset: %v", r)
		}
		if r := rc.call(reqGetMinOffset, map[string]string{"topic": "raw", "queueId": "0"}, nil, ser); r.ext("offset") != "0" {
			t.Fatalf("min offset: %v", r)
		}
		search := func(ts int64) string {
			return rc.call(reqSearchOffsetByTimestamp, map[string]string{"topic": "raw", "queueId": "0", "timestamp": strconv.FormatInt(ts, 10)}, nil, ser).ext("offset")
		}
		if got := search(0); got != "0" {
			t.Fatalf("search from the epoch: %s", got)
		}
		if got := search(time.Now().Add(time.Hour).UnixMilli()); got != strconv.FormatInt(base+1, 10) {
			t.Fatalf("search from the future: %s", got)
		}
		if r := rc.call(reqGetConsumerListByGroup, map[string]string{"consumerGroup": "nobody"}, nil, ser); r.Code != resSystemError {
			t.Fatalf("consumer list of an empty group: %v", r)
		}
		if r := rc.call(reqGetRouteInfoByTopic, map[string]string{"topic": "raw"}, nil, ser); r.Code != resSuccess || !strings.Contains(string(r.Body), b.BrokerAddr()) {
			t.Fatalf("route from the broker port: %v %s", r, r.Body)
		}
		if r := rc.call(9999, nil, nil, ser); r.Code != resNotSupported {
			t.Fatalf("unknown code: %v", r)
		}
	}
}

func TestRawLocks(t *testing.T) {
	b := startBroker(t, Options{LockExpiry: 100 * time.Millisecond})
	rc := dialRaw(t, b.BrokerAddr())
	lock := func(code int16, client string, queues ...int) []mqJSON {
		body := lockBody{ConsumerGroup: "g", ClientID: client}
		for _, q := range queues {
			body.MQs = append(body.MQs, mqJSON{Topic: "t", BrokerName: b.BrokerName(), QueueID: q})
		}
		data, _ := json.Marshal(body)
		r := rc.call(code, nil, data, serializeJSON)
		if r.Code != resSuccess {
			t.Fatalf("lock: %v", r)
		}
		var out struct {
			OK []mqJSON `json:"lockOKMQSet"`
		}
		if len(r.Body) > 0 {
			_ = json.Unmarshal(r.Body, &out)
		}
		return out.OK
	}
	if got := lock(reqLockBatchMQ, "a", 0, 1); len(got) != 2 {
		t.Fatalf("a locks %v", got)
	}
	if got := lock(reqLockBatchMQ, "b", 1, 2); len(got) != 1 || got[0].QueueID != 2 {
		t.Fatalf("b locks %v", got)
	}
	lock(reqUnlockBatchMQ, "a", 1)
	if got := lock(reqLockBatchMQ, "b", 1); len(got) != 1 {
		t.Fatalf("b after unlock %v", got)
	}
	// a's lock on queue 0 expires after LockExpiry without renewal.
	eventually(t, 5*time.Second, "lock expiry", func() bool { return len(lock(reqLockBatchMQ, "b", 0)) == 1 })
}
