package dedupe

import (
	"regexp"
	"strings"
	"testing"
)

// validKVKey is nats.go's rule for key-value keys.
var validKVKey = regexp.MustCompile(`^[-/_=\.a-zA-Z0-9]+$`)

func checkEncoding(t *testing.T, key string) {
	t.Helper()
	enc := EncodeKey(key)
	if !validKVKey.MatchString(enc) || strings.HasPrefix(enc, ".") || strings.HasSuffix(enc, ".") {
		t.Fatalf("EncodeKey(%q) = %q: not a valid KV key", key, enc)
	}
	if strings.Contains(enc, ".") {
		t.Fatalf("EncodeKey(%q) = %q: contains a subject separator", key, enc)
	}
	if len(enc) != encodedKeyLen(key) {
		t.Fatalf("EncodeKey(%q): length %d, encodedKeyLen says %d", key, len(enc), encodedKeyLen(key))
	}
	if len(enc) > maxEscapedKey {
		t.Fatalf("EncodeKey(%q) is %d bytes, over %d", key, len(enc), maxEscapedKey)
	}
	dec, err := DecodeKey(enc)
	if strings.HasPrefix(enc, "=H") {
		if err == nil {
			t.Fatalf("DecodeKey(%q) of a hashed key succeeded", enc)
		}
		if escapedLen(key) <= maxEscapedKey {
			t.Fatalf("EncodeKey(%q) hashed a key that fits", key)
		}
		return
	}
	if err != nil || dec != key {
		t.Fatalf("DecodeKey(EncodeKey(%q)) = %q, %v", key, dec, err)
	}
}

func TestEncodeKey(t *testing.T) {
	cases := []struct{ key, want string }{
		{"", "="},
		{"ORDERS:1234", "ORDERS=3A1234"},
		{"orders/12-ab_C", "orders/12-ab_C"},
		{"a.b", "a=2Eb"},
		{"a=2Eb", "a=3D2Eb"},
		{"=", "=3D"},
		{"\x00\xff", "=00=FF"},
		{"*>", "=2A=3E"},
		{strings.Repeat("k", maxEscapedKey), strings.Repeat("k", maxEscapedKey)},
	}
	for _, tc := range cases {
		if got := EncodeKey(tc.key); got != tc.want {
			t.Errorf("EncodeKey(%q) = %q, want %q", tc.key, got, tc.want)
		}
		checkEncoding(t, tc.key)
	}
	for _, k := range oddKeys {
		checkEncoding(t, k)
	}
	long := strings.Repeat("k", maxEscapedKey+1)
	if got := EncodeKey(long); !strings.HasPrefix(got, "=H") || len(got) != 45 {
		t.Errorf("EncodeKey(long) = %q, want the hashed form", got)
	}
	if EncodeKey(long) == EncodeKey(long+"x") {
		t.Error("two long keys share an encoding")
	}
}

func TestDecodeKeyRejects(t *testing.T) {
	for _, enc := range []string{"", "=H", "=Habc", "a=", "a=4", "a=zz", "a=41" /* 'A' is never escaped */, "a.b", "a b", "=2e"} {
		if dec, err := DecodeKey(enc); err == nil {
			t.Errorf("DecodeKey(%q) = %q, want an error", enc, dec)
		}
	}
}

func FuzzEncodeKey(f *testing.F) {
	for _, k := range oddKeys {
		f.Add(k)
	}
	f.Fuzz(func(t *testing.T, key string) {
		checkEncoding(t, key)
	})
}

// FuzzDecodeKey checks that DecodeKey accepts only canonical encodings, so
// that encoding is a bijection between keys and the strings it produces.
func FuzzDecodeKey(f *testing.F) {
	for _, k := range oddKeys {
		f.Add(EncodeKey(k))
	}
	f.Add("a=")
	f.Add("=41")
	f.Fuzz(func(t *testing.T, enc string) {
		key, err := DecodeKey(enc)
		if err != nil {
			return
		}
		if again := EncodeKey(key); again != enc {
			t.Fatalf("DecodeKey(%q) = %q, which encodes as %q", enc, key, again)
		}
	})
}
