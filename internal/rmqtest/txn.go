package rmqtest

import (
	"strconv"
	"time"
)

// handleEndTransaction commits (the half message becomes visible in its real topic at a new offset)
// or rolls back (dropped) a half message; "unknown" leaves it for the next check-back.
func (b *Broker) handleEndTransaction(req *command) *command {
	action := int(req.extIntDefault("commitOrRollback", -1))
	off := req.extIntDefault("commitLogOffset", -1)
	b.mu.Lock()
	defer b.mu.Unlock()
	h := b.half[off]
	if h == nil {
		// Fall back to the unique key: the client derives commitLogOffset from the msgId it got back.
		for _, cand := range b.half {
			if id := cand.m.props[propUniqKey]; id != "" && (id == req.ext("msgId") || id == req.ext("transactionId")) {
				h = cand
				break
			}
		}
	}
	if h == nil {
		return response(resSystemError, "find prepared transaction message failed")
	}
	switch action {
	case sysFlagTranCommit:
		delete(b.half, h.m.commitOffset)
		props := cloneProps(h.m.props)
		delete(props, propTranPrepared)
		t := b.topics[h.m.topic]
		if t == nil {
			t = b.createTopicLocked(h.m.topic, b.opts.DefaultQueues, permReadWrite)
		}
		qid := h.m.queueID
		if qid >= len(t.queues) {
			qid = 0
		}
		m := &stored{
			queueID: qid, sysFlag: h.m.sysFlag&^sysFlagTranMask | sysFlagTranCommit, flag: h.m.flag,
			body: h.m.body, props: props, bornTimestamp: h.m.bornTimestamp, bornHost: h.m.bornHost,
			reconsumeTimes: h.m.reconsumeTimes, preparedOffset: h.m.commitOffset,
		}
		if lvl := delayLevelOf(props); lvl > 0 {
			m.topic = t.name
			b.scheduleLocked(m, lvl)
		} else {
			b.appendLocked(t, m)
		}
		b.logf("transaction %s committed", props[propUniqKey])
	case sysFlagTranRollback:
		delete(b.half, h.m.commitOffset)
		b.logf("transaction %s rolled back", h.m.props[propUniqKey])
	default:
		// TransactionNotType: the producer does not know yet; check back later.
	}
	return response(resSuccess, "")
}

type checkTarget struct {
	c   *conn
	cmd *command
}

// checkTransactions runs the check-back scan when it is due: CHECK_TRANSACTION_STATE for every
// unresolved half message at least TransactionCheckDelay old, to a producer connection of its group.
// It returns when the next scan is due.
func (b *Broker) checkTransactions(now time.Time) time.Time {
	var sends []checkTarget
	b.mu.Lock()
	if b.nextScan.IsZero() {
		b.nextScan = now.Add(b.opts.TransactionCheckInterval)
	}
	if now.Before(b.nextScan) {
		next := b.nextScan
		b.mu.Unlock()
		return next
	}
	b.nextScan = now.Add(b.opts.TransactionCheckInterval)
	next := b.nextScan
	for off, h := range b.half {
		if now.Sub(h.stored) < b.opts.TransactionCheckDelay {
			continue // not old enough: a later scan
		}
		if h.checks >= b.opts.TransactionCheckMax {
			delete(b.half, off)
			b.discarded = append(b.discarded, h.m)
			b.logf("half message %s discarded after %d check-backs", h.m.props[propUniqKey], h.checks)
			continue
		}
		var conns []*conn
		for c := range b.producers[h.group] {
			conns = append(conns, c)
		}
		if len(conns) == 0 {
			continue // nobody to ask; try again at the next scan without spending a check
		}
		b.rr++
		c := conns[b.rr%uint64(len(conns))]
		h.checks++
		msg := *h.m
		msg.props = cloneProps(h.m.props)
		msg.props[propTranCheckTimes] = strconv.Itoa(h.checks)
		id := msg.props[propUniqKey]
		ext := map[string]string{
			"tranStateTableOffset": fmtInt(msg.queueOffset),
			"commitLogOffset":      fmtInt(msg.commitOffset),
			"msgId":                id,
			"transactionId":        id,
			"offsetMsgId":          offsetMsgID(msg.storeHost, msg.commitOffset),
		}
		sends = append(sends, checkTarget{c: c, cmd: b.onewayRequest(reqCheckTransactionState, ext, msg.encode(nil))})
	}
	b.mu.Unlock()
	for _, s := range sends {
		b.logf("check-back %s", s.cmd.ExtFields["transactionId"])
		s.c.write(s.cmd)
	}
	return next
}
