// LOCK_BATCH_MQ (41) and UNLOCK_BATCH_MQ (42): queue locks of orderly consumers.

package rmqtest

import (
	"encoding/json"
	"time"
)

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
