package bridge

import (
	"strconv"
	"testing"
)

func FuzzHops(f *testing.F) {
	for _, s := range []string{"0", "3", "", "x", "99999999999999999999", "-1", " 2", "+1"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n := hopsOf(map[string][]string{HeaderHops: {s}})
		if n < 0 {
			t.Fatalf("%q gave %d", s, n)
		}
		if v, err := strconv.Atoi(s); err == nil && s[0] != '+' && v >= 0 && n != min(v, 1<<20) {
			t.Fatalf("%q gave %d, want %d", s, n, v)
		}
	})
}
