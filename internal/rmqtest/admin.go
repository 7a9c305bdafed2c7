// GET_MAX_OFFSET (30), GET_MIN_OFFSET (31) and SEARCH_OFFSET_BY_TIMESTAMP (29): queue offset
// lookups, served by the real broker's admin processor.

package rmqtest

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
