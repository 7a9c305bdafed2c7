package tally

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"github.com/cellbridge/cellbridge/router"
)

// Payload is the JSON body of a test event. The key also appears where the
// topic rule reads it (see Encode).
type Payload struct {
	ID   string `json:"id"`  // unique among the events of a run
	Key  string `json:"key"` // shard key
	Seq  int    `json:"seq"` // per-key sequence number, from 1
	Run  string `json:"run"` // the run that sent it
	Sent int64  `json:"sentUnixNano"`
}

// Encode returns the headers and the JSON body of p for a message of rule,
// with p.Key where rule reads the key: nested under the JSON path (a
// number when it is all digits, as producers of user ids send them) or in
// the header. For a RocketMQ keys rule the publisher sets the message keys;
// for a rule that reads a subject token, the publisher sends the message on
// Subject(rule, p.Key, ...).
func Encode(rule *router.Rule, p Payload) (header map[string][]string, body []byte, err error) {
	b, err := json.Marshal(p)
	if err != nil {
		return nil, nil, err
	}
	m := map[string]any{}
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, nil, err
	}
	header = map[string][]string{}
	switch k := rule.Key; {
	case k.JSON != "":
		parts := strings.Split(k.JSON, ".")
		at := m
		for _, part := range parts[:len(parts)-1] {
			next, _ := at[part].(map[string]any)
			if next == nil {
				next = map[string]any{}
				at[part] = next
			}
			at = next
		}
		if isDigits(p.Key) {
			at[parts[len(parts)-1]] = json.Number(p.Key)
		} else {
			at[parts[len(parts)-1]] = p.Key
		}
	case k.Header != "":
		header[k.Header] = []string{p.Key}
	case k.RocketMQKeys, k.SubjectToken != 0:
	default:
		return nil, nil, fmt.Errorf("tally: topic rule %s reads its key from the %s; test events support json, header, subject token and RocketMQ keys", rule.Name, k)
	}
	body, err = json.Marshal(m)
	return header, body, err
}

// Subject returns a subject that rule's NATS source filter matches, for an
// event with key: every wildcard of the filter becomes filler, and for a rule
// that reads its key from a subject token, that token is the key ("orders.*.>"
// with subjectToken 2 and key 42 → "orders.42.<filler>"). For a RocketMQ
// source it returns the topic.
func Subject(rule *router.Rule, key, filler string) string {
	if !rule.Source.IsNATS() {
		return rule.Source.Topic
	}
	toks := strings.Split(rule.Source.Subject, ".")
	for i, t := range toks {
		if t == "*" || t == ">" {
			toks[i] = filler
		}
	}
	if n := rule.Key.SubjectToken; n != 0 {
		i := n - 1
		if n < 0 {
			i = len(toks) + n
		}
		for i >= len(toks) {
			toks = append(toks, filler)
		}
		if i >= 0 {
			toks[i] = key
		}
	}
	return strings.Join(toks, ".")
}

// Decode reads a body written by Encode; an error for anything else.
func Decode(body []byte) (Payload, error) {
	var p Payload
	if err := json.Unmarshal(body, &p); err != nil {
		return p, fmt.Errorf("tally: not a test event: %w", err)
	}
	if p.ID == "" || p.Run == "" {
		return p, errors.New("tally: not a test event: no id or run")
	}
	return p, nil
}

func isDigits(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}
