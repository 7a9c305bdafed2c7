package router

import (
	"fmt"
	"strings"

	"github.com/tidwall/gjson"
)

// Resolve decides where an event of topic rule `topic` with the already
// extracted shard key goes ("" = no key). It never fails: an unknown topic
// gives reason dlq with cause no_route and an empty target; an unusable key
// gives the rule's onMissingKey decision. The happy path does not allocate.
func (t *Table) Resolve(topic, key string) Decision {
	r := t.Rule(topic)
	if r == nil {
		return t.noRoute(topic, key)
	}
	return r.resolve(key)
}

// Route extracts the shard key from m as topic rule `topic` says, then
// resolves it like Resolve. m is not modified and not retained.
func (t *Table) Route(topic string, m *Message) Decision {
	r := t.Rule(topic)
	if r == nil {
		return t.noRoute(topic, "")
	}
	key, cause, why := r.Extract(m)
	if cause != "" {
		return r.unusable(key, cause, why)
	}
	return r.resolve(key)
}

func (t *Table) noRoute(topic, key string) Decision {
	return Decision{Topic: topic, Key: key, Shard: -1, Version: t.version, Reason: ReasonDLQ,
		Cause: CauseNoRoute, Explain: fmt.Sprintf("no topic rule %q", topic)}
}

func (r *Rule) resolve(key string) Decision {
	if key == "" {
		return r.missing
	}
	shard, cause, why := r.shardOf(key)
	if cause != "" {
		return r.unusable(key, cause, why)
	}
	t := r.t
	sr := &t.route[shard]
	if r.pinned != nil && r.pinned[shard] {
		if pi, ok := t.pins[key]; ok {
			if sr.reason == ReasonHeld { // blocking comes before pins
				pr := &t.pinRoute[pi]
				held := shardRoute{cellIdx: pr.cellIdx, cell: pr.cell, reason: ReasonHeld,
					explain: fmt.Sprintf("shard %d is blocked (a cell switch is in progress; the key is pinned to %s): hold and retry", shard, pr.cell)}
				return r.decision(key, shard, &held, Target{})
			}
			return r.decision(key, shard, &t.pinRoute[pi], r.pinTargets[pi])
		}
	}
	var target Target
	switch {
	case sr.reason == ReasonHeld:
	case r.byShard != nil:
		target = r.byShard[shard]
	default:
		target = r.cellTargets[sr.cellIdx]
	}
	return r.decision(key, shard, sr, target)
}

func (r *Rule) decision(key string, shard int, sr *shardRoute, target Target) Decision {
	return Decision{Topic: r.Name, Key: key, Shard: shard, Cell: sr.cell, Target: target,
		Version: r.t.version, Reason: sr.reason, Explain: sr.explain}
}

// unusable builds the onMissingKey decision for a key that cannot be used.
func (r *Rule) unusable(key, cause, why string) Decision {
	d := r.missing
	d.Key = key
	d.Cause = cause
	if d.Reason == ReasonGlobal {
		d.Explain = why + ": global cell " + d.Cell
	} else {
		d.Explain = why + ": dead-letter"
	}
	return d
}

// ShardOf computes the shard of key under the rule's shard function, or
// returns an error saying why the key is unusable.
func (r *Rule) ShardOf(key string) (int, error) {
	if key == "" {
		return -1, fmt.Errorf("empty key")
	}
	s, _, why := r.shardOf(key)
	if why != "" {
		return -1, fmt.Errorf("%s", why)
	}
	return s, nil
}

// shardOf returns the shard, or -1 with a cause and an explanation.
func (r *Rule) shardOf(key string) (int, string, string) {
	n := r.t.shards
	switch r.Shard.Func {
	case ShardDigits:
		lo, hi := r.Shard.From, r.Shard.To
		if lo < 0 {
			lo += len(key)
			if hi == 0 {
				hi = len(key)
			} else {
				hi += len(key)
			}
		}
		if lo < 0 || hi > len(key) {
			return -1, CauseBadKey, fmt.Sprintf("key %q is too short for digits [%d:%d]", key, r.Shard.From, r.Shard.To)
		}
		v := 0
		for i := lo; i < hi; i++ {
			c := key[i]
			if c < '0' || c > '9' {
				return -1, CauseBadKey, fmt.Sprintf("key %q has a non-digit %q where digits [%d:%d] are read", key, c, r.Shard.From, r.Shard.To)
			}
			v = v*10 + int(c-'0')
		}
		return v % n, "", ""
	case ShardMod:
		var v uint64
		for i := 0; i < len(key); i++ {
			c := key[i]
			if c < '0' || c > '9' {
				return -1, CauseBadKey, fmt.Sprintf("key %q is not an unsigned decimal integer (func mod)", key)
			}
			d := uint64(c - '0')
			if v > (^uint64(0)-d)/10 {
				return -1, CauseBadKey, fmt.Sprintf("key %q overflows a 64-bit unsigned integer (func mod)", key)
			}
			v = v*10 + d
		}
		return int(v % uint64(n)), "", ""
	default: // ShardFNV1a
		return int(fnv1a32(key) % uint32(n)), "", ""
	}
}

// Extract reads the shard key from m as the rule's key source says. It
// returns the key, or a cause (CauseMissingKey, CauseBadKey, CauseBadBody)
// and a human explanation when there is no usable key. m is not modified.
func (r *Rule) Extract(m *Message) (key, cause, why string) {
	k := r.Key
	switch {
	case k.Header != "":
		v, ok := headerValue(m.Header, k.Header)
		if !ok || v == "" {
			return "", CauseMissingKey, "no key: header " + k.Header + " is absent or empty"
		}
		return v, "", ""
	case k.JSON != "":
		return r.extractJSON(m.Body)
	case k.SubjectToken != 0:
		tok, ok := subjectToken(m.Subject, k.SubjectToken)
		if !ok || tok == "" {
			return "", CauseMissingKey, fmt.Sprintf("no key: subject %q has no token %d", m.Subject, k.SubjectToken)
		}
		return tok, "", ""
	default:
		if k := firstKey(m.Keys); k != "" {
			return k, "", ""
		}
		return "", CauseMissingKey, "no key: the message has no RocketMQ keys"
	}
}

func (r *Rule) extractJSON(body []byte) (key, cause, why string) {
	path := r.Key.JSON
	res := gjson.GetBytes(body, path)
	if !res.Exists() {
		// Validating the whole body costs a second pass, so it is done only
		// to explain a miss.
		if !gjson.ValidBytes(body) {
			return "", CauseBadBody, "body is not valid JSON"
		}
		return "", CauseMissingKey, "no key: json field " + path + " is absent"
	}
	switch res.Type {
	case gjson.String:
		if res.Str == "" {
			return "", CauseMissingKey, "no key: json field " + path + " is empty"
		}
		return res.Str, "", ""
	case gjson.Number:
		// The raw text, never the float64: 19-digit ids must survive.
		return res.Raw, "", ""
	case gjson.Null:
		return "", CauseMissingKey, "no key: json field " + path + " is null"
	case gjson.True, gjson.False:
		return "", CauseBadKey, "json field " + path + " is a boolean, not a string or number"
	}
	if res.IsArray() {
		return "", CauseBadKey, "json field " + path + " is an array, not a string or number"
	}
	return "", CauseBadKey, "json field " + path + " is an object, not a string or number"
}

// firstKey returns the first of the space-separated RocketMQ keys.
func firstKey(keys string) string {
	keys = strings.TrimLeft(keys, " ")
	if i := strings.IndexByte(keys, ' '); i >= 0 {
		return keys[:i]
	}
	return keys
}

// headerValue looks name up exactly, then case-insensitively; the first
// value counts.
func headerValue(h map[string][]string, name string) (string, bool) {
	if v, ok := h[name]; ok {
		if len(v) == 0 {
			return "", false
		}
		return v[0], true
	}
	for k, v := range h {
		if strings.EqualFold(k, name) && len(v) > 0 {
			return v[0], true
		}
	}
	return "", false
}

// subjectToken returns token n of subject (1-based; negative from the end).
func subjectToken(subject string, n int) (string, bool) {
	if n < 0 {
		n = strings.Count(subject, ".") + 2 + n
		if n < 1 {
			return "", false
		}
	}
	for i := 1; ; i++ {
		dot := strings.IndexByte(subject, '.')
		if i == n {
			if dot < 0 {
				return subject, true
			}
			return subject[:dot], true
		}
		if dot < 0 {
			return "", false
		}
		subject = subject[dot+1:]
	}
}
