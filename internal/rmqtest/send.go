// SEND_MESSAGE (10), SEND_MESSAGE_V2 (310) and SEND_BATCH_MESSAGE (320), prepared
// (transactional) sends included.

package rmqtest

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// sendHeader reads both the long (SEND_MESSAGE) and the short a–n (V2, batch) header names.
type sendHeader struct {
	group, topic                  string
	queueID                       int
	sysFlag, flag                 int32
	bornTimestamp                 int64
	properties                    string
	reconsumeTimes, maxReconsumes int
	batch                         bool
}

func parseSendHeader(req *command) (sendHeader, error) {
	short := req.Code != reqSendMessage
	get := func(long, s string) string {
		if short {
			if v, ok := req.ExtFields[s]; ok {
				return v
			}
		}
		return req.ExtFields[long]
	}
	atoi := func(long, s string, def int64) int64 {
		v := get(long, s)
		if v == "" {
			return def
		}
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return def
		}
		return n
	}
	h := sendHeader{
		group:          get("producerGroup", "a"),
		topic:          get("topic", "b"),
		queueID:        int(atoi("queueId", "e", -1)),
		sysFlag:        int32(atoi("sysFlag", "f", 0)),
		bornTimestamp:  atoi("bornTimestamp", "g", time.Now().UnixMilli()),
		flag:           int32(atoi("flag", "h", 0)),
		properties:     get("properties", "i"),
		reconsumeTimes: int(atoi("reconsumeTimes", "j", 0)),
		maxReconsumes:  int(atoi("maxReconsumeTimes", "l", defaultMaxRetry)),
		batch:          get("batch", "m") == "true" || req.Code == reqSendBatchMessage,
	}
	if h.topic == "" {
		return h, fmt.Errorf("missing topic")
	}
	if len(h.topic) > maxTopicLen {
		return h, fmt.Errorf("topic longer than %d bytes", maxTopicLen)
	}
	if h.maxReconsumes <= 0 {
		h.maxReconsumes = defaultMaxRetry
	}
	return h, nil
}

func (b *Broker) handleSend(c *conn, req *command) {
	b.mu.Lock()
	delay := b.sendDelay
	b.mu.Unlock()
	if delay <= 0 {
		c.respond(req, b.send(c, req))
		return
	}
	// Delayed sends run aside so that the connection's other requests (pulls, heartbeats) go on.
	b.netWG.Add(1)
	go func() {
		defer b.netWG.Done()
		t := time.NewTimer(delay)
		defer t.Stop()
		select {
		case <-t.C:
			c.respond(req, b.send(c, req))
		case <-c.closed:
		}
	}()
}

func (b *Broker) send(c *conn, req *command) *command {
	h, err := parseSendHeader(req)
	if err != nil {
		return response(resMessageIllegal, err.Error())
	}
	var items []batchItem
	if h.batch {
		items, err = decodeBatch(req.Body)
		if err != nil {
			return response(resMessageIllegal, err.Error())
		}
	} else {
		items = []batchItem{{flag: h.flag, body: req.Body, props: parseProperties(h.properties)}}
	}
	for _, it := range items {
		if len(encodeProperties(it.props)) > maxPropertiesLen {
			return response(resMessageIllegal, "message properties too long")
		}
	}

	b.mu.Lock()
	defer b.mu.Unlock()
	if b.failN > 0 {
		b.failN--
		b.logf("send to %s failed by injection (code %d, %d left)", h.topic, b.failCode, b.failN)
		return response(b.failCode, "injected send failure")
	}
	if h.group != "" {
		b.addProducerLocked(h.group, c)
	}
	topicName := h.topic
	prepared := h.sysFlag&sysFlagTranMask == sysFlagTranPrepared ||
		(!h.batch && items[0].props[propTranPrepared] == "true")
	if prepared && h.batch {
		return response(resMessageIllegal, "batch messages cannot be transactional")
	}

	// A send to a retry topic past its reconsume budget goes to the group's dead letter topic.
	if strings.HasPrefix(topicName, retryPrefix) && h.reconsumeTimes >= h.maxReconsumes {
		topicName = dlqPrefix + strings.TrimPrefix(topicName, retryPrefix)
		b.createTopicLocked(topicName, dlqQueues, permWrite)
		for _, it := range items {
			delete(it.props, propDelayLevel)
		}
		h.queueID = 0
	}
	t := b.topics[topicName]
	if t == nil {
		switch {
		case strings.HasPrefix(topicName, retryPrefix):
			t = b.createTopicLocked(topicName, b.opts.RetryQueues, permReadWrite)
		case b.opts.DisableAutoCreate:
			return response(resTopicNotExist, "topic "+topicName+" not exist, apply first please!")
		default:
			t = b.createTopicLocked(topicName, b.opts.DefaultQueues, permReadWrite)
		}
	}
	qid := h.queueID
	if qid < 0 {
		b.rr++
		qid = int(b.rr % uint64(len(t.queues)))
	}
	if qid >= len(t.queues) {
		return response(resSystemError, fmt.Sprintf("request queueId[%d] is illegal, topic %s has %d queues", qid, topicName, len(t.queues)))
	}

	now := time.Now().UnixMilli()
	msgs := make([]*stored, 0, len(items))
	for _, it := range items {
		m := &stored{
			topic: topicName, queueID: qid, sysFlag: h.sysFlag, flag: it.flag, body: it.body,
			props: it.props, bornTimestamp: h.bornTimestamp, bornHost: c.remote, storeTimestamp: now,
			storeHost: b.storeHost, reconsumeTimes: int32(h.reconsumeTimes),
		}
		if h.batch {
			// Inner messages carry their own flag; the batch header's sysFlag applies to each.
			m.sysFlag &^= sysFlagCompressed
		}
		msgs = append(msgs, m)
	}

	resp := response(resSuccess, "")
	resp.ExtFields["queueId"] = strconv.Itoa(qid)
	resp.ExtFields["MSG_REGION"] = "DefaultRegion"
	resp.ExtFields["TRACE_ON"] = "true"
	switch {
	case prepared:
		m := msgs[0]
		m.sysFlag = m.sysFlag&^sysFlagTranMask | sysFlagTranPrepared
		m.queueOffset = b.halfOffset
		b.halfOffset++
		b.assignCommitLocked(m)
		b.half[m.commitOffset] = &halfMsg{m: m, group: firstNonEmpty(m.props[propProducerGroup], h.group),
			stored: time.Now()}
		resp.ExtFields["queueOffset"] = fmtInt(m.queueOffset)
		resp.ExtFields["msgId"] = offsetMsgID(b.storeHost, m.commitOffset)
		resp.ExtFields["transactionId"] = m.props[propUniqKey]
	default:
		ids := make([]string, 0, len(msgs))
		for i, m := range msgs {
			if lvl := delayLevelOf(m.props); lvl > 0 {
				b.scheduleLocked(m, lvl)
			} else {
				b.appendLocked(t, m)
			}
			if i == 0 {
				resp.ExtFields["queueOffset"] = fmtInt(m.queueOffset)
			}
			ids = append(ids, offsetMsgID(b.storeHost, m.commitOffset))
		}
		resp.ExtFields["msgId"] = strings.Join(ids, ",")
	}
	return resp
}

func firstNonEmpty(s ...string) string {
	for _, v := range s {
		if v != "" {
			return v
		}
	}
	return ""
}

func delayLevelOf(props map[string]string) int {
	v, ok := props[propDelayLevel]
	if !ok {
		return 0
	}
	n, err := strconv.Atoi(v)
	if err != nil || n <= 0 {
		return 0
	}
	return min(n, maxDelayLevel)
}
