package rmqtest

import (
	"encoding/json"
	"fmt"
	"sort"
	"strings"
	"time"
)

// group is a consumer group: its live members and the last subscriptions they announced.
type group struct {
	name    string
	members map[string]*member // by client id
	// subs keeps the last announced subscription per topic, also after every member left, so that
	// pulls of a client that reconnected but has not heartbeated yet are still filtered.
	subs map[string]*subscription
}

type member struct {
	clientID string
	c        *conn     // nil when detached by Restart
	detached time.Time // when Restart detached it
	model    string
	beats    int // heartbeats received, for tests
}

// subscription is a TAG subscription expression, compiled.
type subscription struct {
	topic, expr string
	all         bool
	tags        map[string]bool
	unsupported bool // SQL92 or another expression type
}

func parseSubscription(topic, expr, expType string) *subscription {
	s := &subscription{topic: topic, expr: expr}
	if expType != "" && expType != "TAG" {
		s.unsupported = true
		return s
	}
	expr = strings.TrimSpace(expr)
	if expr == "" || expr == "*" {
		s.all = true
		return s
	}
	s.tags = map[string]bool{}
	for _, t := range strings.Split(expr, "||") {
		if t = strings.TrimSpace(t); t != "" {
			s.tags[t] = true
		}
	}
	return s
}

// matches reports whether a message with the given tag passes; a nil subscription takes everything.
func (s *subscription) matches(tag string) bool {
	if s == nil || s.all || s.unsupported {
		return true
	}
	return s.tags[tag]
}

type heartbeatJSON struct {
	ClientID     string `json:"clientID"`
	ProducerData []struct {
		GroupName string `json:"groupName"`
	} `json:"producerDataSet"`
	ConsumerData []struct {
		GroupName    string `json:"groupName"`
		ConsumeType  string `json:"consumeType"`
		MessageModel string `json:"messageModel"`
		Subs         []struct {
			Topic     string            `json:"topic"`
			SubString string            `json:"subString"`
			ExpType   string            `json:"expressionType"`
			Tags      []json.RawMessage `json:"tagsSet"`
		} `json:"subscriptionDataSet"`
	} `json:"consumerDataSet"`
}

func (b *Broker) handleHeartbeat(c *conn, req *command) *command {
	var hb heartbeatJSON
	if err := json.Unmarshal(req.Body, &hb); err != nil {
		return response(resSystemError, "heartbeat body: "+err.Error())
	}
	if hb.ClientID == "" {
		return response(resSystemError, "heartbeat without clientID")
	}
	var changed []string
	b.mu.Lock()
	c.clientID = hb.ClientID
	for _, p := range hb.ProducerData {
		b.addProducerLocked(p.GroupName, c)
	}
	listed := map[string]bool{}
	for _, cd := range hb.ConsumerData {
		listed[cd.GroupName] = true
		g := b.groups[cd.GroupName]
		if g == nil {
			g = &group{name: cd.GroupName, members: map[string]*member{}, subs: map[string]*subscription{}}
			b.groups[cd.GroupName] = g
		}
		m := g.members[hb.ClientID]
		switch {
		case m == nil:
			g.members[hb.ClientID] = &member{clientID: hb.ClientID, c: c, model: cd.MessageModel}
			changed = append(changed, g.name)
		case m.c != c:
			// The same client on a new connection (reconnect, or after Restart): no membership change.
			m.c = c
			m.detached = time.Time{}
		}
		g.members[hb.ClientID].beats++
		for _, s := range cd.Subs {
			g.subs[s.Topic] = parseSubscription(s.Topic, s.SubString, s.ExpType)
		}
		if !strings.EqualFold(cd.MessageModel, "BROADCASTING") {
			b.createTopicLocked(retryPrefix+cd.GroupName, b.opts.RetryQueues, permReadWrite)
		}
	}
	// A client that stopped listing a group left it (the Go client never unregisters explicitly).
	for _, g := range b.groups {
		if m := g.members[hb.ClientID]; m != nil && !listed[g.name] && (m.c == c || m.c == nil) {
			delete(g.members, hb.ClientID)
			changed = append(changed, g.name)
		}
	}
	b.mu.Unlock()
	for _, g := range changed {
		b.notifyGroup(g)
	}
	return response(resSuccess, "")
}

func (b *Broker) handleUnregister(c *conn, req *command) *command {
	clientID := req.ext("clientID")
	var changed []string
	b.mu.Lock()
	if pg := req.ext("producerGroup"); pg != "" {
		delete(b.producers[pg], c)
	}
	if cg := req.ext("consumerGroup"); cg != "" {
		if g := b.groups[cg]; g != nil && g.members[clientID] != nil {
			delete(g.members, clientID)
			changed = append(changed, cg)
		}
	}
	b.mu.Unlock()
	for _, g := range changed {
		b.notifyGroup(g)
	}
	return response(resSuccess, "")
}

func (b *Broker) addProducerLocked(groupName string, c *conn) {
	set := b.producers[groupName]
	if set == nil {
		set = map[*conn]struct{}{}
		b.producers[groupName] = set
	}
	set[c] = struct{}{}
}

// groupMembersLocked lists the client ids of a group, sorted.
func (b *Broker) groupMembersLocked(name string) []string {
	g := b.groups[name]
	if g == nil {
		return nil
	}
	ids := make([]string, 0, len(g.members))
	for id := range g.members {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	return ids
}

func (b *Broker) handleConsumerList(req *command) *command {
	name := req.ext("consumerGroup")
	b.mu.Lock()
	ids := b.groupMembersLocked(name)
	b.mu.Unlock()
	if len(ids) == 0 {
		return response(resSystemError, "no consumer for this group, "+name)
	}
	body, _ := json.Marshal(map[string][]string{"consumerIdList": ids})
	r := response(resSuccess, "")
	r.Body = body
	return r
}

// notifyGroup tells every connected member of a group that the membership changed, so that they
// rebalance now instead of at their next 20s tick.
func (b *Broker) notifyGroup(name string) {
	b.mu.Lock()
	var targets []*conn
	if g := b.groups[name]; g != nil {
		for _, m := range g.members {
			if m.c != nil {
				targets = append(targets, m.c)
			}
		}
	}
	b.mu.Unlock()
	for _, c := range targets {
		c.write(b.onewayRequest(reqNotifyConsumerIdsChange, map[string]string{"consumerGroup": name}, nil))
	}
	if len(targets) > 0 {
		b.logf("notified %d consumers of group %s", len(targets), name)
	}
}

// connClosed forgets what the connection registered. During Restart, consumers are detached instead,
// so that they keep their group membership until they heartbeat again or RestartGrace ends.
func (b *Broker) connClosed(c *conn) {
	var changed []string
	b.mu.Lock()
	delete(b.conns, c)
	restarting := b.state == 2
	for name, set := range b.producers {
		delete(set, c)
		if len(set) == 0 {
			delete(b.producers, name)
		}
	}
	for _, g := range b.groups {
		for id, m := range g.members {
			if m.c != c {
				continue
			}
			if restarting {
				m.c = nil
				m.detached = time.Now()
				continue
			}
			delete(g.members, id)
			changed = append(changed, g.name)
		}
	}
	b.mu.Unlock()
	if len(changed) > 0 {
		b.logf("connection of %s closed: left groups %v", c.clientIDSafe(), changed)
	}
	for _, g := range changed {
		b.notifyGroup(g)
	}
}

func (c *conn) clientIDSafe() string {
	c.b.mu.Lock()
	defer c.b.mu.Unlock()
	if c.clientID == "" {
		return fmt.Sprint(c.remote)
	}
	return c.clientID
}

// expireDetached removes members detached by Restart whose grace ended; it returns when to look again.
func (b *Broker) expireDetached(now time.Time) time.Time {
	next := now.Add(time.Hour)
	var changed []string
	b.mu.Lock()
	for _, g := range b.groups {
		for id, m := range g.members {
			if m.c != nil || m.detached.IsZero() {
				continue
			}
			if until := m.detached.Add(b.opts.RestartGrace); now.Before(until) {
				if until.Before(next) {
					next = until
				}
				continue
			}
			delete(g.members, id)
			changed = append(changed, g.name)
		}
	}
	b.mu.Unlock()
	for _, g := range changed {
		b.notifyGroup(g)
	}
	return next
}
