package router

import (
	"fmt"
	"regexp"
	"strconv"
	"strings"
)

// Placeholders allowed in targets.
const (
	phLiteral = iota
	phCell    // {cell}: the cell name
	phShard   // {shard}: the shard number, zero-padded to the width of shards-1
	phTopic   // {topic}: the topic rule's name
)

var placeholders = map[string]int{"cell": phCell, "shard": phShard, "topic": phTopic}

type tpart struct {
	lit string
	ph  int
}

// tmpl is a parsed target template such as "cell.{cell}.orders".
type tmpl []tpart

func parseTemplate(s string) (tmpl, error) {
	var t tmpl
	for s != "" {
		open := strings.IndexByte(s, '{')
		if cl := strings.IndexByte(s, '}'); cl >= 0 && (open < 0 || cl < open) {
			return nil, fmt.Errorf("unmatched '}' in %q", s)
		}
		if open < 0 {
			t = append(t, tpart{lit: s})
			break
		}
		if open > 0 {
			t = append(t, tpart{lit: s[:open]})
		}
		end := strings.IndexByte(s[open:], '}')
		if end < 0 {
			return nil, fmt.Errorf("unmatched '{' in %q", s)
		}
		name := s[open+1 : open+end]
		ph, ok := placeholders[name]
		if !ok {
			return nil, fmt.Errorf("unknown placeholder {%s} (allowed: {cell}, {shard}, {topic})", name)
		}
		t = append(t, tpart{ph: ph})
		s = s[open+end+1:]
	}
	return t, nil
}

func (t tmpl) has(ph int) bool {
	for _, p := range t {
		if p.ph == ph {
			return true
		}
	}
	return false
}

func (t tmpl) render(cell, shard, topic string) string {
	if len(t) == 1 && t[0].ph == phLiteral {
		return t[0].lit
	}
	var b strings.Builder
	for _, p := range t {
		switch p.ph {
		case phLiteral:
			b.WriteString(p.lit)
		case phCell:
			b.WriteString(cell)
		case phShard:
			b.WriteString(shard)
		case phTopic:
			b.WriteString(topic)
		}
	}
	return b.String()
}

// shardText renders shard s zero-padded to the width of the largest shard
// number, so that {shard} sorts and aligns ("07" of 100 shards).
func shardText(s, shards int) string {
	w := len(strconv.Itoa(shards - 1))
	str := strconv.Itoa(s)
	if len(str) < w {
		str = strings.Repeat("0", w-len(str)) + str
	}
	return str
}

// checkSubject validates a NATS subject; filters may use the wildcards `*`
// (one token) and `>` (the rest, last token only).
func checkSubject(s string, filter bool) error {
	if s == "" {
		return fmt.Errorf("empty subject")
	}
	if strings.ContainsAny(s, " \t\r\n\x00") {
		return fmt.Errorf("subject %q contains whitespace", s)
	}
	toks := strings.Split(s, ".")
	for i, tok := range toks {
		switch {
		case tok == "":
			return fmt.Errorf("subject %q has an empty token", s)
		case tok == "*" || tok == ">":
			if !filter {
				return fmt.Errorf("subject %q: wildcard %q is not allowed here", s, tok)
			}
			if tok == ">" && i != len(toks)-1 {
				return fmt.Errorf("subject %q: '>' must be the last token", s)
			}
		case strings.ContainsAny(tok, "*>"):
			return fmt.Errorf("subject %q: '*' and '>' must be whole tokens", s)
		}
	}
	return nil
}

// subjectMatches reports whether the NATS filter matches subject, where a
// subject token may be matched by tokenEq (used to treat {shard} as any shard
// number).
func subjectMatches(filter string, subject []string, tokenEq func(lit, tok string) bool) bool {
	ft := strings.Split(filter, ".")
	for i, f := range ft {
		if f == ">" {
			return len(subject) > i
		}
		if i >= len(subject) {
			return false
		}
		if f != "*" && !tokenEq(f, subject[i]) {
			return false
		}
	}
	return len(ft) == len(subject)
}

const shardMarker = "\x00"

// templateLoops reports whether the source filter would match the subject
// template rendered for cell, for any shard number in [0, shards).
func templateLoops(filter string, t tmpl, cell, topic string, shards int) bool {
	subj := strings.Split(t.render(cell, shardMarker, topic), ".")
	width := len(strconv.Itoa(shards - 1))
	eq := func(lit, tok string) bool {
		if !strings.Contains(tok, shardMarker) {
			return lit == tok
		}
		parts := strings.Split(tok, shardMarker)
		for i := range parts {
			parts[i] = regexp.QuoteMeta(parts[i])
		}
		re := regexp.MustCompile("^" + strings.Join(parts, fmt.Sprintf("([0-9]{%d})", width)) + "$")
		m := re.FindStringSubmatch(lit)
		if m == nil {
			return false
		}
		for _, n := range m[1:] {
			if v, err := strconv.Atoi(n); err != nil || v >= shards {
				return false
			}
		}
		return true
	}
	return subjectMatches(filter, subj, eq)
}
