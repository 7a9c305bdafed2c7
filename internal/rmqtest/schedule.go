package rmqtest

import (
	"strconv"
	"time"
)

// scheduleLocked parks m in SCHEDULE_TOPIC_XXXX (queue level-1) until its delay level passes, as the
// real broker does; the real topic and queue travel in the REAL_TOPIC and REAL_QID properties.
func (b *Broker) scheduleLocked(m *stored, level int) {
	m.props[propRealTopic] = m.topic
	m.props[propRealQueueID] = strconv.Itoa(m.queueID)
	t := b.createTopicLocked(scheduleTopic, maxDelayLevel, permReadWrite)
	m.queueID = level - 1
	b.appendLocked(t, m)
	b.poke()
}

// delayOf is the scaled delay of a level.
func (b *Broker) delayOf(level int) time.Duration {
	return time.Duration(float64(delayLevels[level-1]) * b.opts.DelayScale)
}

// deliverScheduled moves due scheduled messages to their real topics and returns the next due time.
func (b *Broker) deliverScheduled(now time.Time) time.Time {
	next := now.Add(time.Hour)
	b.mu.Lock()
	defer b.mu.Unlock()
	st := b.topics[scheduleTopic]
	if st == nil {
		return next
	}
	for lvl := 1; lvl <= maxDelayLevel; lvl++ {
		q := st.queues[lvl-1]
		for b.schedule[lvl-1] < len(q.msgs) {
			sm := q.msgs[b.schedule[lvl-1]]
			due := time.UnixMilli(sm.storeTimestamp).Add(b.delayOf(lvl))
			if now.Before(due) {
				if due.Before(next) {
					next = due
				}
				break
			}
			b.schedule[lvl-1]++
			b.deliverLocked(sm)
		}
	}
	return next
}

func (b *Broker) deliverLocked(sm *stored) {
	props := cloneProps(sm.props)
	realTopic := props[propRealTopic]
	qid, _ := strconv.Atoi(props[propRealQueueID])
	delete(props, propDelayLevel)
	t := b.topics[realTopic]
	if t == nil {
		queues := b.opts.DefaultQueues
		if len(realTopic) > len(retryPrefix) && realTopic[:len(retryPrefix)] == retryPrefix {
			queues = b.opts.RetryQueues
		}
		t = b.createTopicLocked(realTopic, queues, permReadWrite)
	}
	if qid < 0 || qid >= len(t.queues) {
		qid = 0
	}
	m := &stored{
		queueID: qid, sysFlag: sm.sysFlag, flag: sm.flag, body: sm.body, props: props,
		bornTimestamp: sm.bornTimestamp, bornHost: sm.bornHost, reconsumeTimes: sm.reconsumeTimes,
	}
	b.appendLocked(t, m)
}
