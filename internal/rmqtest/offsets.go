// QUERY_CONSUMER_OFFSET (14) and UPDATE_CONSUMER_OFFSET (15): a group's committed offsets.

package rmqtest

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
