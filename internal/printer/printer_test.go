package printer

import (
	"errors"
	"strings"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestPrintfWritesInOrder(t *testing.T) {
	var b strings.Builder
	p := New(&b)
	p.Printf("a=%d\n", 1)
	p.Printf("b=%s\n", "x")
	if err := p.Err(); err != nil {
		t.Fatalf("Err() = %v, want nil", err)
	}
	if got, want := b.String(), "a=1\nb=x\n"; got != want {
		t.Fatalf("written %q, want %q", got, want)
	}
}

// failAfter accepts n writes, then fails every write.
type failAfter struct {
	n      int
	writes []string
}

var errFull = errors.New("disk full")

func (f *failAfter) Write(b []byte) (int, error) {
	if f.n == 0 {
		return 0, errFull
	}
	f.n--
	f.writes = append(f.writes, string(b))
	return len(b), nil
}

func TestFirstErrorSticks(t *testing.T) {
	w := &failAfter{n: 1}
	p := New(w)
	p.Printf("one\n")
	p.Printf("two\n")
	w.n = 5 // the writer recovers; the printer stays stopped
	p.Printf("three\n")
	if err := p.Err(); !errors.Is(err, errFull) {
		t.Fatalf("Err() = %v, want %v", err, errFull)
	}
	if len(w.writes) != 1 || w.writes[0] != "one\n" {
		t.Fatalf("writes %q, want only %q", w.writes, "one\n")
	}
}
