// The in-memory store: topics, their queues and the commit log offsets every request family shares.

package rmqtest

import "time"

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
