package dedupe

import (
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"strings"
)

// Key encoding for the KV store. A KV key may hold only [-/_=.A-Za-z0-9]
// and must not start or end with '.', while an idempotency key may hold any
// byte. The encoding keeps [-/_A-Za-z0-9] as they are (so "stream:seq"
// keys stay readable in `nats kv ls`) and writes every other byte as '='
// and two upper-case hex digits. '.' is escaped too: each '.' would make
// another subject token for the server to index. The empty key is "=".
// A key whose escaped form is longer than maxEscapedKey is stored as
// "=H" + base64url(SHA-256(key)), which keeps subjects short; a SHA-256
// collision is not a practical concern. Neither "=" alone nor "=H" can come
// out of escaping, so the three forms never collide.
const maxEscapedKey = 256

const hexDigits = "0123456789ABCDEF"

// keyLiteral reports whether b is kept as it is.
func keyLiteral(b byte) bool {
	return 'a' <= b && b <= 'z' || 'A' <= b && b <= 'Z' || '0' <= b && b <= '9' || b == '-' || b == '_' || b == '/'
}

// escapedLen is the length of key's escaped form.
func escapedLen(key string) int {
	n := len(key)
	for i := 0; i < len(key); i++ {
		if !keyLiteral(key[i]) {
			n += 2
		}
	}
	return n
}

// appendKey writes the encoded form of key to b (prefix included by the
// caller); one allocation at most, for the result.
func appendKey(b *strings.Builder, key string) {
	n := escapedLen(key)
	switch {
	case len(key) == 0:
		b.WriteByte('=')
	case n > maxEscapedKey:
		sum := sha256.Sum256([]byte(key))
		var out [2 + 43]byte
		out[0], out[1] = '=', 'H'
		base64.RawURLEncoding.Encode(out[2:], sum[:])
		b.Write(out[:])
	case n == len(key):
		b.WriteString(key)
	default:
		for i := 0; i < len(key); i++ {
			c := key[i]
			if keyLiteral(c) {
				b.WriteByte(c)
				continue
			}
			b.WriteByte('=')
			b.WriteByte(hexDigits[c>>4])
			b.WriteByte(hexDigits[c&0xF])
		}
	}
}

// encodedKeyLen is the exact length appendKey writes.
func encodedKeyLen(key string) int {
	n := escapedLen(key)
	switch {
	case len(key) == 0:
		return 1
	case n > maxEscapedKey:
		return 2 + 43
	}
	return n
}

// EncodeKey returns the KV key under which the KV store keeps key. It is
// exported for operators and tools that inspect the bucket.
func EncodeKey(key string) string {
	var b strings.Builder
	b.Grow(encodedKeyLen(key))
	appendKey(&b, key)
	return b.String()
}

// errHashedKey is returned by DecodeKey for the hashed form.
var errHashedKey = errors.New("dedupe: key is stored as a hash and cannot be decoded")

// DecodeKey reverses EncodeKey. Long keys stored as a hash cannot be
// recovered and give an error, as does a string EncodeKey never returns.
func DecodeKey(enc string) (string, error) {
	switch {
	case enc == "=":
		return "", nil
	case strings.HasPrefix(enc, "=H"):
		return "", errHashedKey
	case enc == "":
		return "", errors.New("dedupe: empty encoded key")
	}
	out := make([]byte, 0, len(enc))
	for i := 0; i < len(enc); i++ {
		c := enc[i]
		if keyLiteral(c) {
			out = append(out, c)
			continue
		}
		if c != '=' || i+2 >= len(enc) {
			return "", errors.New("dedupe: malformed encoded key")
		}
		hi, lo := strings.IndexByte(hexDigits, enc[i+1]), strings.IndexByte(hexDigits, enc[i+2])
		if hi < 0 || lo < 0 {
			return "", errors.New("dedupe: malformed encoded key")
		}
		v := byte(hi<<4 | lo)
		if keyLiteral(v) { // never escaped by EncodeKey: not canonical
			return "", errors.New("dedupe: malformed encoded key")
		}
		out = append(out, v)
		i += 2
	}
	if len(out) == 0 || escapedLen(string(out)) > maxEscapedKey {
		return "", errors.New("dedupe: malformed encoded key")
	}
	return string(out), nil
}
