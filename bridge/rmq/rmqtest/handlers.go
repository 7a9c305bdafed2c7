package rmqtest

import (
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Request codes (the client's internal/request.go).
const (
	reqSendMessage             = 10
	reqPullMessage             = 11
	reqQueryConsumerOffset     = 14
	reqUpdateConsumerOffset    = 15
	reqSearchOffsetByTimestamp = 29
	reqGetMaxOffset            = 30
	reqGetMinOffset            = 31
	reqHeartBeat               = 34
	reqUnregisterClient        = 35
	reqConsumerSendMsgBack     = 36
	reqEndTransaction          = 37
	reqGetConsumerListByGroup  = 38
	reqCheckTransactionState   = 39
	reqNotifyConsumerIdsChange = 40
	reqLockBatchMQ             = 41
	reqUnlockBatchMQ           = 42
	reqGetRouteInfoByTopic     = 105
	reqSendMessageV2           = 310
	reqSendBatchMessage        = 320
)

// Response codes (the client's internal/response.go plus the broker's own).
const (
	resSuccess            = 0
	resSystemError        = 1
	resNotSupported       = 3
	resMessageIllegal     = 13
	resServiceUnavailable = 14
	resTopicNotExist      = 17
	resPullNotFound       = 19
	resPullRetryImmediate = 20
	resPullOffsetMoved    = 21
	resQueryNotFound      = 22
)

func (b *Broker) dispatch(c *conn, req *command) {
	b.mu.Lock()
	b.requests[req.Code]++
	netStop := b.netStop
	b.mu.Unlock()
	if refuseIfStopping(c, req, netStop) {
		return
	}
	if c.nameServer {
		switch req.Code {
		case reqGetRouteInfoByTopic:
			c.respond(req, b.handleRoute(req))
		default:
			c.respond(req, response(resNotSupported, fmt.Sprintf("request code %d not supported by the name server", req.Code)))
		}
		return
	}
	switch req.Code {
	case reqSendMessage, reqSendMessageV2, reqSendBatchMessage:
		b.handleSend(c, req)
	case reqPullMessage:
		b.handlePull(c, req)
	case reqHeartBeat:
		c.respond(req, b.handleHeartbeat(c, req))
	case reqUnregisterClient:
		c.respond(req, b.handleUnregister(c, req))
	case reqGetConsumerListByGroup:
		c.respond(req, b.handleConsumerList(req))
	case reqQueryConsumerOffset:
		c.respond(req, b.handleQueryOffset(req))
	case reqUpdateConsumerOffset:
		c.respond(req, b.handleUpdateOffset(req))
	case reqGetMaxOffset, reqGetMinOffset, reqSearchOffsetByTimestamp:
		c.respond(req, b.handleOffsetLookup(req))
	case reqConsumerSendMsgBack:
		c.respond(req, b.handleSendBack(req))
	case reqEndTransaction:
		c.respond(req, b.handleEndTransaction(req))
	case reqLockBatchMQ:
		c.respond(req, b.handleLock(req))
	case reqUnlockBatchMQ:
		c.respond(req, b.handleUnlock(req))
	case reqGetRouteInfoByTopic:
		c.respond(req, b.handleRoute(req))
	default:
		c.respond(req, response(resNotSupported, fmt.Sprintf("request code %d not supported", req.Code)))
	}
}

// ---- routes ----

type queueData struct {
	BrokerName     string `json:"brokerName"`
	ReadQueueNums  int    `json:"readQueueNums"`
	WriteQueueNums int    `json:"writeQueueNums"`
	Perm           int    `json:"perm"`
	TopicSynFlag   int    `json:"topicSynFlag"`
}

type brokerData struct {
	Cluster     string            `json:"cluster"`
	BrokerName  string            `json:"brokerName"`
	BrokerAddrs map[string]string `json:"brokerAddrs"`
}

type routeData struct {
	QueueDatas  []queueData  `json:"queueDatas"`
	BrokerDatas []brokerData `json:"brokerDatas"`
}

func (b *Broker) handleRoute(req *command) *command {
	name := req.ext("topic")
	b.mu.Lock()
	t := b.topics[name]
	if t == nil && strings.HasPrefix(name, retryPrefix) && len(name) > len(retryPrefix) {
		// The consumer asks for its retry topic's route before its first heartbeat would create it;
		// answering right away spares a 30s wait for the next route refresh.
		t = b.createTopicLocked(name, b.opts.RetryQueues, permReadWrite)
	}
	var rd routeData
	if t != nil {
		rd = routeData{
			QueueDatas: []queueData{{BrokerName: b.opts.BrokerName, ReadQueueNums: len(t.queues),
				WriteQueueNums: len(t.queues), Perm: t.perm}},
			BrokerDatas: []brokerData{{Cluster: b.opts.ClusterName, BrokerName: b.opts.BrokerName,
				BrokerAddrs: map[string]string{"0": b.brAddr}}},
		}
	}
	b.mu.Unlock()
	if t == nil {
		return response(resTopicNotExist, "No topic route info in name server for the topic: "+name)
	}
	body, err := json.Marshal(rd)
	if err != nil {
		return response(resSystemError, err.Error())
	}
	resp := response(resSuccess, "")
	resp.Body = body
	return resp
}

// createTopicLocked creates a topic or returns the existing one. b.mu must be held.
func (b *Broker) createTopicLocked(name string, queues, perm int) *topic {
	if t := b.topics[name]; t != nil {
		return t
	}
	t := &topic{name: name, perm: perm}
	for range queues {
		t.queues = append(t.queues, &queue{notify: make(chan struct{})})
	}
	b.topics[name] = t
	return t
}

// ---- send ----

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
			nextCheck: time.Now().Add(b.opts.TransactionCheckDelay)}
		resp.ExtFields["queueOffset"] = fmtInt(m.queueOffset)
		resp.ExtFields["msgId"] = offsetMsgID(b.storeHost, m.commitOffset)
		resp.ExtFields["transactionId"] = m.props[propUniqKey]
		b.poke()
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

// assignCommitLocked gives m its commit log offset (a running byte position, as in a real commit log).
func (b *Broker) assignCommitLocked(m *stored) {
	m.commitOffset = b.nextCommit
	m.size = m.encodedSize()
	b.nextCommit += int64(m.size)
	b.byCommit[m.commitOffset] = m
}

// appendLocked stores m at the end of its queue of t and wakes long polls on that queue.
func (b *Broker) appendLocked(t *topic, m *stored) {
	q := t.queues[m.queueID]
	m.topic = t.name
	m.queueOffset = int64(len(q.msgs))
	if m.storeTimestamp == 0 {
		m.storeTimestamp = time.Now().UnixMilli()
	}
	m.storeHost = b.storeHost
	b.assignCommitLocked(m)
	q.msgs = append(q.msgs, m)
	close(q.notify)
	q.notify = make(chan struct{})
}

// ---- pull ----

type pullArgs struct {
	group, topic string
	queueID      int
	offset       int64
	maxMsgs      int
	sub          *subscription
}

func (b *Broker) handlePull(c *conn, req *command) {
	a := pullArgs{
		group:   req.ext("consumerGroup"),
		topic:   req.ext("topic"),
		queueID: int(req.extIntDefault("queueId", -1)),
		offset:  req.extIntDefault("queueOffset", 0),
		maxMsgs: int(req.extIntDefault("maxMsgNums", 32)),
	}
	sysFlag := req.extIntDefault("sysFlag", 0)
	suspend := time.Duration(req.extIntDefault("suspendTimeoutMillis", 0)) * time.Millisecond
	if b.opts.MaxSuspend > 0 && suspend > b.opts.MaxSuspend {
		suspend = b.opts.MaxSuspend
	}
	if a.maxMsgs <= 0 {
		a.maxMsgs = 1
	}
	a.maxMsgs = min(a.maxMsgs, 1024)

	b.mu.Lock()
	if sysFlag&1 != 0 {
		if off := req.extIntDefault("commitOffset", -1); off >= 0 && b.topics[a.topic] != nil {
			b.offsets[offsetKey{a.group, a.topic, a.queueID}] = off
		}
	}
	if sysFlag&4 != 0 {
		a.sub = parseSubscription(a.topic, req.ext("subscription"), req.ext("expressionType"))
	} else if g := b.groups[a.group]; g != nil {
		a.sub = g.subs[a.topic]
	}
	b.mu.Unlock()
	if a.sub != nil && a.sub.unsupported {
		c.respond(req, response(resSystemError, "only TAG subscriptions are supported by this broker"))
		return
	}

	b.mu.Lock()
	netStop := b.netStop
	b.mu.Unlock()
	if refuseIfStopping(c, req, netStop) {
		return
	}
	resp, notify := b.pullOnce(&a)
	if resp != nil {
		c.respond(req, resp)
		return
	}
	if sysFlag&2 == 0 || suspend <= 0 {
		c.respond(req, b.notFound(&a))
		return
	}
	// Long polling: hold the request until a message arrives in the queue or the suspend time ends.
	b.mu.Lock()
	select {
	case <-netStop:
		b.mu.Unlock()
		c.respond(req, restartingResponse())
		return
	default:
	}
	// Added under b.mu, which stopNetwork holds to close netStop: no Add races with its Wait.
	b.pullWG.Add(1)
	b.mu.Unlock()
	go func() {
		defer b.pullWG.Done()
		timer := time.NewTimer(suspend)
		defer timer.Stop()
		for {
			select {
			case <-notify:
				resp, notify = b.pullOnce(&a)
				if resp != nil && resp.Code == resPullRetryImmediate && notify != nil {
					// Only messages the subscription skips arrived: keep holding past them, as the
					// real broker wakes held pulls for matching tags only.
					a.offset, _ = strconv.ParseInt(resp.ext("nextBeginOffset"), 10, 64)
					continue
				}
				if resp != nil {
					c.respond(req, resp)
					return
				}
			case <-timer.C:
				resp, _ = b.pullOnce(&a)
				if resp == nil {
					resp = b.notFound(&a)
				}
				c.respond(req, resp)
				return
			case <-c.closed:
				return
			case <-netStop:
				// Restart or Close: answer now with a code the client backs off from (3s) instead of
				// leaving the pull to its 30s timeout, as the client never fails a request whose
				// connection closed. The connection closes once every held pull is answered.
				c.respond(req, restartingResponse())
				return
			}
		}
	}()
}

// refuseIfStopping answers req with restartingResponse when netStop is
// closed (Restart or Close under way) and reports whether it did.
func refuseIfStopping(c *conn, req *command, netStop <-chan struct{}) bool {
	select {
	case <-netStop:
		c.respond(req, restartingResponse())
		return true
	default:
		return false
	}
}

// restartingResponse is a code the client backs off from (3s) and retries.
func restartingResponse() *command {
	return response(resServiceUnavailable, "broker is restarting")
}

// notFound is the PULL_NOT_FOUND answer at the request's offset.
func (b *Broker) notFound(a *pullArgs) *command {
	b.mu.Lock()
	defer b.mu.Unlock()
	var maxOff int64
	if t := b.topics[a.topic]; t != nil && a.queueID >= 0 && a.queueID < len(t.queues) {
		maxOff = int64(len(t.queues[a.queueID].msgs))
	}
	next := a.offset
	if maxOff == 0 {
		next = 0
	}
	return pullResponse(resPullNotFound, next, maxOff)
}

func pullResponse(code int16, next, maxOff int64) *command {
	r := response(code, "")
	r.ExtFields["nextBeginOffset"] = fmtInt(next)
	r.ExtFields["minOffset"] = "0"
	r.ExtFields["maxOffset"] = fmtInt(maxOff)
	r.ExtFields["suggestWhichBrokerId"] = "0"
	return r
}

// pullOnce answers a pull from the store. It returns nil and the queue's notify channel when there is
// nothing new at the offset (the caller long-polls or answers PULL_NOT_FOUND).
func (b *Broker) pullOnce(a *pullArgs) (*command, <-chan struct{}) {
	b.mu.Lock()
	defer b.mu.Unlock()
	t := b.topics[a.topic]
	if t == nil {
		return response(resTopicNotExist, "topic["+a.topic+"] not exist, apply first please!"), nil
	}
	if a.queueID < 0 || a.queueID >= len(t.queues) {
		return response(resSystemError, fmt.Sprintf("queueId[%d] is illegal, topic:[%s] read queue nums:[%d]", a.queueID, a.topic, len(t.queues))), nil
	}
	q := t.queues[a.queueID]
	maxOff := int64(len(q.msgs))
	switch {
	case a.offset < 0:
		return pullResponse(resPullOffsetMoved, 0, maxOff), nil
	case maxOff == 0 || a.offset == maxOff:
		return nil, q.notify
	case a.offset > maxOff:
		return pullResponse(resPullOffsetMoved, maxOff, maxOff), nil
	}
	var body []byte
	found := 0
	next := a.offset
	for off := a.offset; off < maxOff && off-a.offset < maxScanPerPull; off++ {
		m := q.msgs[off]
		if found > 0 && (found >= a.maxMsgs || len(body)+int(m.size) > maxPullBytes) {
			break
		}
		next = off + 1
		if !a.sub.matches(m.props[propTags]) {
			continue
		}
		body = m.encode(body)
		found++
	}
	if found == 0 {
		// No match in the scanned range; the notify channel lets a held pull wait past it.
		var notify <-chan struct{}
		if next == maxOff {
			notify = q.notify
		}
		return pullResponse(resPullRetryImmediate, next, maxOff), notify
	}
	r := pullResponse(resSuccess, next, maxOff)
	r.Body = body
	return r, nil
}

// ---- offsets ----

func (b *Broker) handleQueryOffset(req *command) *command {
	k := offsetKey{req.ext("consumerGroup"), req.ext("topic"), int(req.extIntDefault("queueId", -1))}
	b.mu.Lock()
	defer b.mu.Unlock()
	if off, ok := b.offsets[k]; ok {
		r := response(resSuccess, "")
		r.ExtFields["offset"] = fmtInt(off)
		return r
	}
	// A group without an offset starts at 0 while the queue still holds its first message (the
	// in-memory store never deletes, so that is always the case for existing queues).
	if t := b.topics[k.topic]; t != nil && k.queue >= 0 && k.queue < len(t.queues) {
		r := response(resSuccess, "")
		r.ExtFields["offset"] = "0"
		return r
	}
	return response(resQueryNotFound, "Not found, V3_0_6_SNAPSHOT maybe this group consumer boot first")
}

func (b *Broker) handleUpdateOffset(req *command) *command {
	off, err := req.extInt("commitOffset")
	if err != nil {
		return response(resSystemError, err.Error())
	}
	k := offsetKey{req.ext("consumerGroup"), req.ext("topic"), int(req.extIntDefault("queueId", -1))}
	b.mu.Lock()
	b.offsets[k] = off
	b.mu.Unlock()
	return response(resSuccess, "")
}

func (b *Broker) handleOffsetLookup(req *command) *command {
	name := req.ext("topic")
	qid := int(req.extIntDefault("queueId", -1))
	b.mu.Lock()
	defer b.mu.Unlock()
	var msgs []*stored
	if t := b.topics[name]; t != nil && qid >= 0 && qid < len(t.queues) {
		msgs = t.queues[qid].msgs
	}
	var off int64
	switch req.Code {
	case reqGetMaxOffset:
		off = int64(len(msgs))
	case reqGetMinOffset:
		off = 0
	case reqSearchOffsetByTimestamp:
		ts := req.extIntDefault("timestamp", 0)
		off = int64(len(msgs))
		for i, m := range msgs {
			if m.storeTimestamp >= ts {
				off = int64(i)
				break
			}
		}
	}
	r := response(resSuccess, "")
	r.ExtFields["offset"] = fmtInt(off)
	return r
}

// ---- send back / retry ----

func (b *Broker) handleSendBack(req *command) *command {
	group := req.ext("group")
	off, err := req.extInt("offset")
	if err != nil || group == "" {
		return response(resSystemError, "send back: missing group or offset")
	}
	delayLevel := int(req.extIntDefault("delayLevel", 0))
	maxRe := int(req.extIntDefault("maxReconsumeTimes", defaultMaxRetry))
	if maxRe <= 0 {
		maxRe = defaultMaxRetry
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	orig := b.byCommit[off]
	if orig == nil {
		return response(resSystemError, fmt.Sprintf("look message by offset failed, %d", off))
	}
	props := cloneProps(orig.props)
	if _, ok := props[propRetryTopic]; !ok {
		props[propRetryTopic] = orig.topic
	}
	if props[propOriginMsgID] == "" {
		props[propOriginMsgID] = offsetMsgID(orig.storeHost, orig.commitOffset)
	}
	m := &stored{
		sysFlag: orig.sysFlag, flag: orig.flag, body: orig.body, props: props,
		bornTimestamp: orig.bornTimestamp, bornHost: orig.bornHost, reconsumeTimes: orig.reconsumeTimes + 1,
		storeTimestamp: time.Now().UnixMilli(),
	}
	if int(orig.reconsumeTimes) >= maxRe || delayLevel < 0 {
		t := b.createTopicLocked(dlqPrefix+group, dlqQueues, permWrite)
		delete(props, propDelayLevel)
		m.queueID = 0
		b.appendLocked(t, m)
		return response(resSuccess, "")
	}
	if delayLevel == 0 {
		delayLevel = 3 + int(orig.reconsumeTimes)
	}
	delayLevel = min(delayLevel, maxDelayLevel)
	props[propDelayLevel] = strconv.Itoa(delayLevel)
	t := b.createTopicLocked(retryPrefix+group, b.opts.RetryQueues, permReadWrite)
	b.rr++
	m.topic = t.name
	m.queueID = int(b.rr % uint64(len(t.queues)))
	b.scheduleLocked(m, delayLevel)
	return response(resSuccess, "")
}

// ---- locks (orderly consumers) ----

type mqJSON struct {
	Topic      string `json:"topic"`
	BrokerName string `json:"brokerName"`
	QueueID    int    `json:"queueId"`
}

type lockBody struct {
	ConsumerGroup string   `json:"consumerGroup"`
	ClientID      string   `json:"clientId"`
	MQs           []mqJSON `json:"mqSet"`
}

func (b *Broker) handleLock(req *command) *command {
	var body lockBody
	if err := json.Unmarshal(req.Body, &body); err != nil {
		return response(resSystemError, "lock body: "+err.Error())
	}
	now := time.Now()
	ok := []mqJSON{}
	b.mu.Lock()
	for _, mq := range body.MQs {
		k := lockKey{body.ConsumerGroup, mq.Topic, mq.BrokerName, mq.QueueID}
		l := b.locks[k]
		if l == nil || l.clientID == body.ClientID || now.After(l.until) {
			b.locks[k] = &lockState{clientID: body.ClientID, until: now.Add(b.opts.LockExpiry)}
			ok = append(ok, mq)
		}
	}
	b.mu.Unlock()
	out, _ := json.Marshal(map[string][]mqJSON{"lockOKMQSet": ok})
	r := response(resSuccess, "")
	r.Body = out
	return r
}

func (b *Broker) handleUnlock(req *command) *command {
	var body lockBody
	if err := json.Unmarshal(req.Body, &body); err != nil {
		return response(resSystemError, "unlock body: "+err.Error())
	}
	b.mu.Lock()
	for _, mq := range body.MQs {
		k := lockKey{body.ConsumerGroup, mq.Topic, mq.BrokerName, mq.QueueID}
		if l := b.locks[k]; l != nil && l.clientID == body.ClientID {
			delete(b.locks, k)
		}
	}
	b.mu.Unlock()
	return response(resSuccess, "")
}
